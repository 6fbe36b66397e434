"""Runs that are killed, repeated, changed or run twice at once, and bad input that stops a run midway."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main

from support import assert_gone, copy_run, descendants, started_and_skipped, write_config

REPO = Path(__file__).resolve().parents[1]
RELEASE_FILES = ("merged/model.safetensors", "gptq/model.safetensors")


def digests(run_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in RELEASE_FILES}


@pytest.fixture(scope="module")
def reference(finished_run, tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run, this module's own copy (tests re-run and damage it): (config, run directory)."""
    return copy_run(finished_run, tmp_path_factory.mktemp("reference"))


def rerun(config: Path, run_dir: Path, *args: str) -> tuple[list[str], list[str]]:
    """Run again; the stages it started and skipped."""
    log = run_dir / "run.log"
    before = log.read_text()
    assert main(["run", str(config), *args]) == EXIT_OK
    return started_and_skipped(log.read_text()[len(before) :])


def test_a_repeated_run_skips_every_stage_and_changes_nothing(reference):
    config, run_dir = reference
    before = digests(run_dir)
    assert rerun(config, run_dir) == ([], ["merge", "requantize", "reference", "score_merged", "score_gptq"])
    assert digests(run_dir) == before
    report = json.loads((run_dir / "report.json").read_text())
    assert report["output_sha256"]["merge"]["merged/model.safetensors"] == before["merged/model.safetensors"]


def test_changed_settings_rerun_that_stage_and_what_depends_on_it(reference):
    config, run_dir = reference
    before = digests(run_dir)
    started, skipped = rerun(config, run_dir, "--set", "requantize.damp_percent=0.02")
    assert (started, skipped) == (["requantize", "score_gptq"], ["merge", "reference", "score_merged"])
    changed = digests(run_dir)  # the new setting took effect: another GPTQ checkpoint from the same merge
    assert changed["merged/model.safetensors"] == before["merged/model.safetensors"]
    assert changed["gptq/model.safetensors"] != before["gptq/model.safetensors"]
    started, _ = rerun(config, run_dir)  # back to the original settings
    assert started == ["requantize", "score_gptq"]
    assert digests(run_dir) == before


def test_force_reruns_one_stage_and_identical_output_keeps_the_rest(reference):
    config, run_dir = reference
    before = digests(run_dir)
    assert rerun(config, run_dir, "--force", "merge") == (
        ["merge"],
        ["requantize", "reference", "score_merged", "score_gptq"],
    )
    assert "stage merge: start (--force merge)" in (run_dir / "run.log").read_text()
    assert digests(run_dir) == before


def test_one_model_is_rescored_by_name_and_every_model_by_kind(reference):
    config, run_dir = reference
    scores = run_dir / "evaluation" / "merged" / "scores.json"
    merged, record = scores.read_bytes(), (run_dir / "stages" / "score_merged.json").read_bytes()
    before = (run_dir / "report.json").stat().st_mtime_ns
    assert rerun(config, run_dir, "--force", "score_gptq") == (
        ["score_gptq"],
        ["merge", "requantize", "reference", "score_merged"],
    )
    assert (scores.read_bytes(), (run_dir / "stages" / "score_merged.json").read_bytes()) == (merged, record)
    assert (run_dir / "report.json").stat().st_mtime_ns > before  # the report is rebuilt from every record
    finished = json.loads(record)["finished"]
    assert rerun(config, run_dir, "--stages", "score", "--force", "score") == (["score_merged", "score_gptq"], [])
    assert json.loads((run_dir / "stages" / "score_merged.json").read_text())["finished"] > finished  # re-scored ...
    assert scores.read_bytes() == merged  # ... to the same scores, byte for byte


def test_a_damaged_output_is_rebuilt(reference):
    config, run_dir = reference
    before = digests(run_dir)
    (run_dir / "gptq" / "model.safetensors").write_bytes(b"damaged")
    # The rebuilt GPTQ checkpoint is byte-identical, so its scores still stand.
    assert rerun(config, run_dir) == (["requantize"], ["merge", "reference", "score_merged", "score_gptq"])
    assert "stage requantize: start (outputs missing or modified)" in (run_dir / "run.log").read_text()
    assert digests(run_dir) == before


def test_a_job_split_into_steps_writes_the_same_bytes_as_one_run(tmp_path, reference, capsys):
    """A scheduler's steps: each `--stages` step needs the stages it reads complete and unchanged, and the steps
    together give what one run gives; the report comes with the evaluation."""
    config, run_dir = reference
    split = tmp_path / "run"

    def step(kinds: str) -> int:
        return main(["run", str(config), "--set", f"output_dir={split}", "--stages", kinds])

    assert step("score") == EXIT_BAD_INPUT
    assert "the merge stage is not complete and unchanged (not run before)" in capsys.readouterr().err
    assert not split.exists()
    assert step("merge") == EXIT_OK
    assert "Stages done: merge;" in capsys.readouterr().err and not (split / "report.json").exists()
    assert step("evaluate") == EXIT_BAD_INPUT
    assert "the requantize stage is not complete" in capsys.readouterr().err
    assert step("requantize") == EXIT_OK
    assert step("reference") == EXIT_OK and not (split / "report.json").exists()
    assert step("score") == EXIT_OK
    assert digests(split) == digests(run_dir)
    ours, theirs = (json.loads((folder / "report.json").read_text()) for folder in (split, run_dir))
    assert {name: model["ppl"] for name, model in ours["models"].items()} == {
        name: model["ppl"] for name, model in theirs["models"].items()
    }
    assert started_and_skipped((split / "run.log").read_text())[0] == [
        "merge",
        "requantize",
        "reference",
        "score_merged",
        "score_gptq",
    ]


HOLD_A_STAGE = """
import sys
from pathlib import Path
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.lock import RunLocks
layout = RunLayout(Path(sys.argv[1]))
with RunLocks(layout).stage(sys.argv[2]):  # a job scoring the model: its output half-written
    partial = layout.partial(layout.scores(sys.argv[3]))
    partial.mkdir()
    (partial / "scores.json").write_text("{")
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_a_job_waits_for_a_stage_another_job_is_running_and_never_deletes_its_work_in_progress(reference, capsys):
    """Another job (Slurm array task 77_1) is scoring the merged model. A job whose plan dropped that model leaves it
    be; `report` refuses; a job that needs the stage waits for it, saying who runs it, then takes its lock, clears
    what the dead job left and finds the stage complete."""
    config, run_dir = reference
    array_task = {**os.environ, "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_STAGE, str(run_dir), "score_merged", "merged"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=array_task,
    )
    in_progress = run_dir / "evaluation" / ".merged.partial"
    try:
        assert holder.stdout.readline().strip() == "holding"
        running = f"pid {holder.pid} on {os.uname().nodename}, Slurm job 77_1"
        assert main(["report", str(run_dir)]) == EXIT_BAD_INPUT
        assert f"the score_merged stage is running in another job ({running})" in capsys.readouterr().err
        assert main(["run", str(config), "--set", "evaluation.models=[gptq]"]) == EXIT_OK
        assert "stage score_merged: no longer in the plan, but another job is running it; left as is" in (
            capsys.readouterr().err
        )
        assert (run_dir / "stages" / "score_merged.json").is_file() and in_progress.is_dir()
        needs_it = subprocess.Popen(
            [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        waiting = f"stage score_merged: running in another job ({running}); waiting for it to finish"
        lines = []
        while not any(waiting in line for line in lines):
            lines.append(needs_it.stderr.readline())
            assert lines[-1], "".join(lines)
        assert in_progress.is_dir()  # the waiting job's clean-up left it
    finally:
        holder.communicate("")
    _, errors = needs_it.communicate(timeout=300)
    assert needs_it.returncode == EXIT_OK, errors[-2000:]
    assert not in_progress.exists()  # the holder is gone: what it left is a leftover, cleared by the next holder
    last_run = (run_dir / "run.log").read_text().split("run " + str(run_dir))[-1]
    assert started_and_skipped(last_run) == ([], ["merge", "requantize", "reference", "score_merged", "score_gptq"])
    assert "merged" in json.loads((run_dir / "report.json").read_text())["models"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before reaching the kill point"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_killed_inside_each_stage_then_rerun_gives_identical_outputs(
    reference, tmp_path, tiny_base, tiny_adapter, text_files
):
    _, reference_dir = reference
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, run_dir)
    command = [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(config)]
    completed_before_kill = []
    stage_folders = {
        "merge": "merged",
        "requantize": "gptq",
        "reference": "evaluation/reference",
        "score_merged": "evaluation/merged",
        "score_gptq": "evaluation/gptq",
    }
    for stage in ("merge", "requantize", "score_gptq"):
        folder = run_dir / stage_folders[stage]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(folder.with_name(f".{folder.name}.partial"), process)
        workers = descendants(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_gone(workers)  # the scoring process dies with the run: nothing writes into the run directory after
        # Nothing half-written is visible: each stage folder present is complete and has its record.
        for name, output in stage_folders.items():
            assert (run_dir / output).is_dir() == (run_dir / "stages" / f"{name}.json").is_file()
        completed_before_kill.append([p.stem for p in (run_dir / "stages").glob("*.json")])
        assert stage not in completed_before_kill[-1]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    # killed while scoring the last model: the run before it scored the others, the re-run scores only that one
    assert sorted(completed_before_kill[-1]) == ["merge", "reference", "requantize", "score_merged"]
    last_run = (run_dir / "run.log").read_text().split("run " + str(run_dir))[-1]
    assert started_and_skipped(last_run) == (["score_gptq"], ["merge", "requantize", "reference", "score_merged"])
    assert digests(run_dir) == digests(reference_dir)
    leftovers = [p for p in run_dir.rglob(".*") if p.name.endswith((".partial", ".old"))]
    assert not leftovers


@pytest.fixture
def corrupt_copy(tmp_path, tiny_base):
    """A copy of the tiny base whose given tensor gets a NaN."""

    def make(key: str) -> Path:
        base = tmp_path / "corrupt-base"
        shutil.copytree(tiny_base, base)
        tensors = load_file(base / "model.safetensors")
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = float("nan")
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        return base

    return make


def test_nan_in_the_base_exits_2_naming_the_tensor(tmp_path, corrupt_copy, tiny_adapter, text_files, capsys):
    base = corrupt_copy("model.layers.1.mlp.up_proj.weight")
    config = write_config(tmp_path / "run.yaml", base, tiny_adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{base}: tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf; the base checkpoint is "
        "corrupt" in capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "merged").exists()


def test_inf_in_the_adapter_exits_2_naming_the_tensor(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = write_config(tmp_path / "run.yaml", tiny_base, adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"error: {adapter / 'adapter_model.safetensors'}: tensor {key!r} contains NaN or Inf; the adapter is "
        "corrupt" in capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "merged").exists()


def test_too_little_disk_for_the_next_stage_exits_2_and_keeps_completed_stages(
    tmp_path, tiny_base, tiny_adapter, text_files, monkeypatch, capsys
):
    import qlora_requant.pipeline.files

    real = shutil.disk_usage
    calls = []

    def tight_after_merge(path):
        usage = real(path)
        calls.append(path)
        return usage._replace(free=1000) if (tmp_path / "run" / "merged").is_dir() else usage

    monkeypatch.setattr(qlora_requant.pipeline.files.shutil, "disk_usage", tight_after_merge)
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'}: 0.0 MB free, but the requantize stage needs about" in err
    assert "free some space or choose an output_dir on a larger disk" in err
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / ".gptq.partial").exists()


def test_overlapping_eval_text_can_be_allowed_with_a_warning(
    tmp_path, tiny_base, tiny_adapter, text_files, caplog, capsys
):
    overlapping = {**text_files, "eval": text_files["calibration"]}
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, overlapping, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    refused = re.search(r"shares (\d+) passage\(s\) with requantize.calibration", capsys.readouterr().err)
    from qlora_requant.pipeline.config import load_config
    from qlora_requant.pipeline.preflight import preflight

    caplog.clear()
    inputs = preflight(load_config(config, ["evaluation.overlap=warn"]), "cpu")
    assert refused
    warnings = [r.getMessage() for r in caplog.records if r.name == "qlora_requant.pipeline.preflight"]
    overlap = (
        f"evaluation text shares {refused[1]} passage(s) with the calibration text "
        "(evaluation.overlap: warn); its scores favour the GPTQ model"
    )
    assert warnings.count(overlap) == 1 and overlap in inputs.warnings  # said once, and kept for the report
    assert inputs.evaluation.texts == inputs.calibration.texts  # scored anyway


def test_a_hub_dataset_with_hf_hub_offline_set_exits_2(
    tmp_path, tiny_base, tiny_adapter, text_files, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    assert (
        main(
            [
                "run",
                str(config),
                "--set",
                "evaluation.text={dataset: wikitext, dataset_config: wikitext-2-raw-v1, split: test}",
            ]
        )
        == EXIT_BAD_INPUT
    )
    assert "evaluation.text.dataset names a hub dataset, but HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_runs_without_a_hub_dataset_are_offline(tmp_path, tiny_base, tiny_adapter, text_files, monkeypatch, capsys):
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    for name in offline:  # conftest.py sets HF_HUB_OFFLINE itself; the policy must set both on its own
        monkeypatch.delenv(name, raising=False)
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_OK
    assert [os.environ.get(name) for name in offline] == ["1", "1"]

    # A config that names a hub dataset leaves the network alone. Its output_dir inside the adapter makes
    # preflight stop at its first check, after the policy but before the dataset is looked up on the hub.
    for name in offline:
        monkeypatch.delenv(name)
    hub = write_config(tmp_path / "hub.yaml", tiny_base, tiny_adapter, text_files, tiny_adapter / "run")
    assert main(["validate", str(hub), "--set", "evaluation.text={dataset: x}"]) == EXIT_BAD_INPUT
    assert f"output_dir {tiny_adapter / 'run'} is inside adapter.path" in capsys.readouterr().err
    assert [os.environ.get(name) for name in offline] == [None, None]


def test_a_tokenizer_with_its_own_code_needs_trust_remote_code(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    base = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_base, base)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = write_config(tmp_path / "run.yaml", base, tiny_adapter, text_files, tmp_path / "run")
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert (
        f"{base / 'tokenizer_config.json'}: the tokenizer ships its own Python code (auto_map), which "
        "qlora-requant does not run unless trust_remote_code: true" in capsys.readouterr().err
    )


def test_yaml_is_loaded_safely(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the payload would create its file
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    assert f"{config}: not valid YAML" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.parametrize("which", ["calibration", "eval"])
def test_an_empty_text_file_exits_2_naming_it(tmp_path, tiny_base, tiny_adapter, text_files, which, capsys):
    empty = tmp_path / f"empty-{which}.txt"
    empty.write_text("\n\n")
    config = write_config(
        tmp_path / "run.yaml", tiny_base, tiny_adapter, {**text_files, which: empty}, tmp_path / "run"
    )
    assert main(["run", str(config)]) == EXIT_BAD_INPUT
    assert f"{empty}: holds no text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_weights_and_a_missing_shard_exit_2(tmp_path, tiny_base, tiny_adapter, text_files, capsys):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_base, no_weights)
    (no_weights / "model.safetensors").unlink()
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_base, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for base, expected in (
        (
            no_weights,
            f"{no_weights}: no model.safetensors or model.safetensors.index.json; "
            "give a Hugging Face checkpoint folder saved with safetensors",
        ),
        (
            sharded,
            f"{sharded / 'model-00002-of-00002.safetensors'}: listed in model.safetensors.index.json but missing",
        ),
    ):
        config = write_config(tmp_path / "run.yaml", base, tiny_adapter, text_files, tmp_path / "run")
        assert main(["validate", str(config)]) == EXIT_BAD_INPUT
        assert expected in capsys.readouterr().err


def test_progress_is_a_line_every_30_seconds_when_not_on_a_terminal(caplog, monkeypatch):
    import itertools
    import logging

    from qlora_requant.pipeline import progress as progress_module

    clock = itertools.count(0, 10)  # each item takes 10 s
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="qlora_requant.console")
    assert list(progress_module.progress(list(range(20)), "merge", "tensors")) == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "merge: 3/20 tensors (15%), 0.1 tensors/s, about 170 s left"
    assert lines[-1] == "merge: 20/20 tensors (100%)"
    assert [line.split("/")[0] for line in lines] == [f"merge: {n}" for n in (3, 6, 9, 12, 15, 18, 20)]
