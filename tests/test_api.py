"""The Python API (`import qlora_requant`): the command line's work as functions, its errors as one exception type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qlora_requant
from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main

from support import copy_run


def test_importing_the_package_loads_no_model_library_and_is_typed():
    probe = "import sys, qlora_requant; qlora_requant.run; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    assert (Path(qlora_requant.__file__).parent / "py.typed").is_file()
    assert all(getattr(qlora_requant, name).__module__.startswith("qlora_requant.") for name in qlora_requant.__all__)


def test_load_report_is_the_typed_report_json(finished_run, tmp_path):
    _, run_dir = finished_run
    report = qlora_requant.load_report(run_dir)
    assert isinstance(report, qlora_requant.Report) and report.run_dir == run_dir
    assert report.model_dump(mode="json") == json.loads((run_dir / "report.json").read_text())
    assert qlora_requant.load_report(run_dir / "report.json").release_candidate == report.release_candidate

    with pytest.raises(qlora_requant.InputError) as missing:
        qlora_requant.load_report(tmp_path)
    assert str(missing.value) == (
        f"{tmp_path / 'report.json'}: no report there; rebuild it with `qlora-requant report {tmp_path}` once every "
        "stage is complete"
    )
    older = json.loads((run_dir / "report.json").read_text()) | {"schema_version": 3}
    (tmp_path / "report.json").write_text(json.dumps(older))
    with pytest.raises(qlora_requant.InputError, match="a report of schema version 3, and this qlora-requant reads"):
        qlora_requant.load_report(tmp_path)


def test_validate_takes_a_dict_and_overrides_and_returns_the_plan_the_cli_prints(finished_run, capsys):
    config, _ = finished_run
    tree = yaml.safe_load(config.read_text())
    plan = qlora_requant.validate(tree, set={"requantize.variants": [{"name": "w4"}, {"name": "w3", "bits": 3}]})
    assert plan.stages == [
        "merge",
        "requantize_w4",
        "requantize_w3",
        "reference",
        "score_merged",
        "score_gptq_w4",
        "score_gptq_w3",
    ]
    assert plan.models == ["merged", "gptq_w4", "gptq_w3"] and plan.gptq["w3"].bits == 3 and plan.device == "cpu"
    assert [(s.key, s.value, s.source) for s in plan.bnb][:2] == [
        ("quant_type", "nf4", "default"),
        ("blocksize", "64", "default"),
    ]
    assert (
        main(
            ["validate", str(config), "--set", "requantize.variants=[{name: w4}, {name: w3, bits: 3}]", "--list-models"]
        )
        == EXIT_OK
    )
    assert capsys.readouterr().out.split() == plan.models


def test_bad_input_raises_input_error_with_the_message_the_cli_prints(finished_run, tmp_path, capsys):
    config, _ = finished_run
    for bad in ({"requantize.bits": 5}, ["evaluation.text.path=missing.txt"]):
        with pytest.raises(qlora_requant.InputError) as raised:
            qlora_requant.run(config, set=bad)
        cli_set = [f"--set={assignment}" for assignment in (bad if isinstance(bad, list) else ["requantize.bits=5"])]
        assert main(["run", str(config), *cli_set]) == EXIT_BAD_INPUT
        assert capsys.readouterr().err == f"error: {raised.value}\n"
    with pytest.raises(qlora_requant.InputError, match="--stages: 'merg' is not a stage; give one or more of"):
        qlora_requant.run(config, stages=["merg"])
    with pytest.raises(qlora_requant.InputError, match=r"--models 7: this run has 2 models \(0 merged, 1 gptq\)"):
        qlora_requant.run(config, models=[7])


def test_run_resumes_a_run_and_returns_its_report_or_none_for_a_job_of_some_models(finished_run, tmp_path):
    config, run_dir = copy_run(finished_run, tmp_path)
    report = qlora_requant.run(qlora_requant.RunConfig.model_validate(yaml.safe_load(config.read_text())))
    assert report.run_dir == run_dir and report.gate.passed is not None
    assert report.model_dump(mode="json") == json.loads((run_dir / "report.json").read_text())
    assert qlora_requant.run(str(config), stages="score", models="gptq", force="score_gptq") is None
