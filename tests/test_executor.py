"""The stage executor's rules, on stub stages that take milliseconds: skip, re-run, publish, record."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest

from qlora_requant.pipeline.context import Inputs, StageContext
from qlora_requant.pipeline.executor import StageExecutor
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.plan import Stage
from qlora_requant.quant.calibration import Corpus
from qlora_requant.quant.errors import InputError

VERSIONS = {"torch": "2.13.0"}


def write_text(context: StageContext, out: Path, *, text: str, calls: list[str], name: str) -> dict:
    calls.append(name)
    (out / "data.txt").write_text(text)
    return {"chars": len(text)}


def copy_upper(context: StageContext, out: Path, *, source: str, calls: list[str], name: str) -> dict:
    calls.append(name)
    (out / "data.txt").write_text((context.layout.root / source / "data.txt").read_text().upper())
    return {}


def stub_plan(root: Path, calls: list[str], text: str = "hello", kind_a: str = "merge") -> list[Stage]:
    """Stage a writes `text` into a/, stage b (reading a/) writes it upper-cased into b/."""
    return [
        Stage(
            name="a",
            kind=kind_a,
            output=root / "a",
            settings={"text": text},
            inputs=(),
            work=partial(write_text, text=text, calls=calls, name="a"),
        ),
        Stage(
            name="b",
            kind="requantize",
            output=root / "b",
            settings={},
            inputs=(root / "a",),
            work=partial(copy_upper, source="a", calls=calls, name="b"),
        ),
    ]


NO_DATA = Corpus("none", [])


def execute(root: Path, stages: list[Stage], force=frozenset(), versions=VERSIONS) -> StageExecutor:
    root.mkdir(exist_ok=True)
    layout = RunLayout(root)
    context = StageContext(
        device="cpu",
        layout=layout,
        inputs=Inputs(base=None, adapter=None, tokenizer_dir=layout.root, calibration=NO_DATA, evaluation=NO_DATA),
    )
    executor = StageExecutor(layout, versions, set(force))
    executor.run(stages, context)
    return executor


def test_a_second_run_skips_every_complete_stage(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    assert calls == ["a", "b"] and (tmp_path / "b" / "data.txt").read_text() == "HELLO"
    record = json.loads((tmp_path / "stages" / "b.json").read_text())
    assert record["summary"] == {} and list(record["outputs"]) == ["b/data.txt"]
    assert list(record["input_files"]) == ["a/data.txt"]  # inside the run: recorded relative to it
    executor = execute(tmp_path, stub_plan(tmp_path, calls))
    assert calls == ["a", "b"] and executor.skipped == ["a", "b"]


def test_changed_settings_rerun_the_stage_and_what_reads_changed_bytes(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    execute(tmp_path, stub_plan(tmp_path, calls, text="world"))
    assert calls == ["a", "b", "a", "b"] and (tmp_path / "b" / "data.txt").read_text() == "WORLD"


def test_forced_stage_with_identical_output_leaves_the_next_standing(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    executor = execute(tmp_path, stub_plan(tmp_path, calls), force={"merge"})
    assert calls == ["a", "b", "a"] and executor.skipped == ["b"]


def test_a_modified_output_or_new_library_versions_rerun(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    (tmp_path / "b" / "data.txt").write_text("tampered")
    execute(tmp_path, stub_plan(tmp_path, calls))
    assert calls == ["a", "b", "b"] and (tmp_path / "b" / "data.txt").read_text() == "HELLO"
    execute(tmp_path, stub_plan(tmp_path, calls), versions={"torch": "2.14.0"})
    assert calls == ["a", "b", "b", "a", "b"]


def test_a_moved_run_directory_resumes(tmp_path):
    calls: list[str] = []
    execute(tmp_path / "run", stub_plan(tmp_path / "run", calls))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    executor = execute(tmp_path / "moved", stub_plan(tmp_path / "moved", calls))
    assert calls == ["a", "b"] and executor.skipped == ["a", "b"]


def failing(context: StageContext, out: Path) -> dict:
    (out / "half.txt").write_text("half")
    raise RuntimeError("stage failed")


def test_a_failing_stage_publishes_nothing_and_keeps_the_previous_result(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    record = (tmp_path / "stages" / "b.json").read_bytes()
    failing_b = Stage(name="b", kind="requantize", output=tmp_path / "b", settings={"v": 2}, inputs=(), work=failing)
    with pytest.raises(RuntimeError, match="stage failed"):
        execute(tmp_path, [stub_plan(tmp_path, calls)[0], failing_b])
    assert not (tmp_path / ".b.partial").exists()
    # The previous output and its record stand together, so the previous plan finds the stage complete.
    assert (tmp_path / "b" / "data.txt").read_text() == "HELLO"
    assert (tmp_path / "stages" / "b.json").read_bytes() == record
    assert execute(tmp_path, stub_plan(tmp_path, calls)).skipped == ["a", "b"]


def test_records_of_stages_no_longer_planned_are_dropped(tmp_path):
    calls: list[str] = []
    execute(tmp_path, stub_plan(tmp_path, calls))
    execute(tmp_path, stub_plan(tmp_path, calls)[:1])
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["a.json"]


def test_too_little_disk_stops_before_the_stage_runs(tmp_path):
    calls: list[str] = []
    stage = Stage(
        name="a",
        kind="merge",
        output=tmp_path / "a",
        settings={},
        inputs=(),
        work=partial(write_text, text="x", calls=calls, name="a"),
        needed_bytes=lambda context: 10**18,
    )
    with pytest.raises(InputError, match=r"free, but the a stage needs about 1000000000\.00 GB"):
        execute(tmp_path, [stage])
    assert calls == [] and not (tmp_path / "a").exists() and not (tmp_path / ".a.partial").exists()
