"""The console is for people: stage lines, progress and the final table; library output goes to run.log."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from support import write_config

STAGE_LINE = re.compile(
    r"^\d\d:\d\d:\d\d (run |stage |\S+: checking the inputs |(merge|dequantize): \d+/\d+ tensors \(100%\)$"
    r"|requantize: \d+/\d+ layers|requantize: checking that the GPTQ checkpoint loads|reference: loading the NF4 base "
    r"|score_\w+: loading |(reference: \w+|score_\w+): \d+/\d+ windows)"
)


def test_a_run_prints_stage_lines_and_the_table_and_logs_library_output(tmp_path, tiny_base, tiny_adapter, text_files):
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    temporary = set(Path(tempfile.gettempdir()).glob("gptqmodel_*")) | set(Path(tempfile.gettempdir()).glob("qlora-*"))
    done = subprocess.run(
        [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the stages' processes remove their temporary folders (gptqmodel's offload among them) before they end
    left = set(Path(tempfile.gettempdir()).glob("gptqmodel_*")) | set(Path(tempfile.gettempdir()).glob("qlora-*"))
    assert left <= temporary, sorted(left - temporary)
    console = done.stderr.splitlines()
    warnings = [line.split(" ", 1)[1] for line in console if not STAGE_LINE.match(line)]
    # once each, before the stages: gptqmodel's about the calibration data, and the model cards' missing license
    assert [warning.split(";")[0] for warning in warnings] == [
        "warning: release.license is not set and the base's model card (README.md) names none: the GPTQ model "
        "cards will carry no license",
        "warning: GPTQ calibrates on 16 samples",
        "warning: the calibration samples average 64 tokens",
    ]
    assert console[0].endswith("run.yaml: checking the inputs (base, adapter, tokenizer, data) after loading torch")
    for stage in ("merge", "requantize", "reference", "score_merged", "score_gptq"):
        assert sum(f"stage {stage}: start (not run before)" in line for line in console) == 1
        assert sum(f"stage {stage}: done in" in line for line in console) == 1
    # progress: not a terminal, so a line every 30 s and at the end (this run takes less)
    assert sum("merge: " in line and "tensors (" in line for line in console) == 1
    assert [line.split(" ", 1)[1] for line in console if "windows" in line] == [
        "reference: baseline: 24/24 windows (100%)",
        "reference: base_nf4: 24/24 windows (100%)",
        "score_merged: 24/24 windows (100%)",
        "score_gptq: 24/24 windows (100%)",
    ]
    assert sum(line.endswith("requantize: 2/2 layers (100%)") for line in console) == 1
    assert done.stdout.lstrip().startswith("model     what it is")
    assert "Release gate: none configured" in done.stdout

    log = (tmp_path / "run" / "run.log").read_text()
    # the log has every console line too, but those printed before the run directory is taken: the first, and the
    # input checks' warnings (which run.json and the report keep)
    assert all(line.split(" ", 1)[1] in log for line in console[1:] if STAGE_LINE.match(line))
    gptqmodel_lines = [line for line in log.splitlines() if "gptq" in line.lower() and "stage " not in line]
    assert len(gptqmodel_lines) > 20, log[-3000:]


def test_help_and_version_answer_without_loading_the_model_libraries():
    """--help and --version import no torch, transformers, peft or gptqmodel (which take seconds to import)."""
    from importlib.metadata import version

    for flag in ("--help", "--version"):
        probe = (
            "import sys\nfrom qlora_requant.pipeline.cli import main\n"
            f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'gptqmodel') if m in sys.modules))"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        lines = done.stdout.splitlines()
        assert lines[-1] == "[]", (flag, done.stdout, done.stderr)
        assert lines[0] == (f"qlora-requant {version('qlora-requant')}" if flag == "--version" else lines[0])
        assert flag != "--help" or lines[0].startswith("usage: qlora-requant")
    for command in ("run", "validate", "report"):  # positional arguments explained, exit codes listed
        done = subprocess.run(
            [sys.executable, "-m", "qlora_requant.pipeline.cli", command, "--help"], capture_output=True, text=True
        )
        usage = " ".join(done.stdout.split())
        assert "the output_dir of a run" in usage or "the run's YAML config" in usage
        assert "exit codes: 0 success; 1 unexpected failure; 2 bad input" in usage and "3 the run finished" in usage
