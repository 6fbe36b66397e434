"""The console is for people: stage lines, progress and the final table; library output goes to run.log."""

from __future__ import annotations

import re
import subprocess
import sys

from support import write_config

STAGE_LINE = re.compile(r"^\d\d:\d\d:\d\d (run |stage |(merge|dequantize): \d+/\d+ tensors \(\d+%\))")


def test_a_run_prints_stage_lines_and_the_table_and_logs_library_output(tmp_path, tiny_base, tiny_adapter, text_files):
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stderr.splitlines()
    assert [line for line in console if not STAGE_LINE.match(line)] == []
    for stage in ("merge", "requantize", "evaluate"):
        assert sum(f"stage {stage}: start (not run before)" in line for line in console) == 1
        assert sum(f"stage {stage}: done in" in line for line in console) == 1
    merge_progress = [line for line in console if "merge: " in line and "tensors (" in line]
    assert len(merge_progress) >= 10 and merge_progress[-1].endswith("(100%)")  # a line every 10%
    assert done.stdout.lstrip().startswith("model     what it is")
    assert "Release gate: none configured" in done.stdout

    log = (tmp_path / "run" / "run.log").read_text()
    assert all(line.split(" ", 1)[1] in log for line in console)  # the log has every console line too
    gptqmodel_lines = [line for line in log.splitlines() if "gptq" in line.lower() and "stage " not in line]
    assert len(gptqmodel_lines) > 20, log[-3000:]
