"""Running planned stages in a run directory: skip what is done, publish outputs whole, record everything.

Each completed stage leaves a record in RUN_DIR/stages/ with its manifest (the settings it used,
the hashes of the files it read, the library versions) and the hashes of what it wrote. A stage is
skipped when its manifest still matches and its outputs are intact, so a run killed at any moment
and started again redoes only the unfinished work. Stage outputs are written into a temporary
folder and renamed into place only when complete. Several jobs may work on one run directory at once: each
stage runs under its own lock, and the stages whose outputs it reads are held shared meanwhile (see lock.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from qlora_requant.pipeline.console import console
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.files import describe_write_failure, publish_dir, require_free_space, write_failure
from qlora_requant.pipeline.isolated import start_server
from qlora_requant.pipeline.layout import MODEL_CARD, RunLayout
from qlora_requant.pipeline.lock import RunLocks
from qlora_requant.pipeline.manifest import file_records, hashes, sha256
from qlora_requant.pipeline.metrics import measure
from qlora_requant.pipeline.plan import Stage
from qlora_requant.pipeline.records import RecordError, read_record, write_record
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)

# A stage's outputs are every file it wrote; only the model card, which the report writes into the GPTQ
# folder afterwards, is not one. (Later stages' inputs also leave out gptqmodel's log: see layout.py.)
OUTPUT_NOT_CONTENT = (MODEL_CARD,)
MEMORY = ("rss_start_mb", "peak_rss_mb", "peak_gpu_mb")  # of the measures of a step (pipeline/metrics.py)


class StageExecutor:
    """Runs stages in order in one run directory, skipping each that is complete and unchanged.

    `verify` says how far recorded hashes are trusted. fast: a file whose size and modification time
    are as recorded keeps its recorded SHA-256, but every file of the run directory that a stage is
    about to read is hashed again first, so a stage never computes from bytes that changed behind a
    kept modification time. full: every file is hashed again on every run.
    """

    def __init__(
        self,
        layout: RunLayout,
        versions: dict[str, str],
        force: set[str] | frozenset[str] = frozenset(),
        verify: str = "fast",
    ):
        self.layout = layout
        self.versions = versions  # library versions: a change re-runs every stage
        self.force = frozenset(force)  # stages to re-run anyway, by kind or by name
        self.verify = verify
        self.files: dict[str, dict] = {}  # every file hashed in this run, by recorded name: each is read once
        self.skipped: list[str] = []
        self.current: str | None = None  # the stage being run
        self.locks = RunLocks(layout)
        self._producers: dict[str, str] = {}  # run-directory file -> the stage that wrote it
        self._rehashed: set[str] = set()  # run-directory files hashed again in this run (verify: fast)

    def run(self, stages: list[Stage], context: StageContext, plan: list[Stage] | None = None) -> None:
        """Run `stages` in order; forget records of stages the plan (default: `stages`) no longer has."""
        plan = stages if plan is None else plan
        self.layout.stage_records.mkdir(exist_ok=True)
        planned = {stage.name for stage in plan}
        with self.locks.run():
            for record in sorted(self.layout.stage_records.glob("*.json")):
                if record.stem not in planned:
                    self._remove_unplanned(record)
        for stage in stages:
            with self.locks.stage(stage.name, reads=[other.name for other in plan if stage.reads(other)]):
                self._run_stage(stage, context)

    def clear_leftovers(self, plan: list[Stage]) -> None:
        """Remove what interrupted jobs left of the planned stages (temporary and replaced folders and records),
        except of those another job is running now: that is its work in progress."""
        for stage in plan:
            lock = self.locks.stage_file(stage.name)
            if not lock.acquire(wait=False):
                continue
            try:
                self._clear_leftovers(stage)
            finally:
                lock.release()

    def require_complete(self, stages: list[Stage], context: StageContext, held: ExitStack) -> None:
        """Refuse, before anything runs, stages that are not run now but whose outputs a chosen stage reads
        (see `qlora-requant run --stages`), unless each is complete and unchanged. Each is held shared in `held`
        (after waiting for a job that runs it now), so that no other job re-runs it while this one reads it."""
        for stage in stages:
            if self.layout.locks.is_dir():  # else no job has worked here yet: nothing to wait for
                held.enter_context(self.locks.reading(stage.name, reader="this job's stages"))
            previous, input_files, manifest = self._state(stage, context)
            if previous:  # run by another job, it stands on the device it ran on (a CPU node's merge, say)
                manifest["settings"]["device"] = previous["manifest"]["settings"].get("device")
            reason, outputs = self.rerun_reason(stage, previous, manifest, forced=False)
            if reason is not None:
                raise InputError(
                    f"--stages: the {stage.name} stage is not complete and unchanged ({reason}), and a chosen stage "
                    f"reads its output {stage.output}; run it first: qlora-requant run CONFIG --stages {stage.kind}"
                )
            self._remember(stage, outputs)

    def _state(self, stage: Stage, context: StageContext) -> tuple[dict | None, dict[str, dict], dict]:
        """The stage's previous record, the records of its input files, and its manifest now."""
        previous = self._previous_record(stage)
        input_files = self._records(stage.inputs, previous["input_files"] if previous else {})
        manifest = {
            "settings": {**stage.settings, "device": context.device},
            "versions": self.versions,
            "inputs": hashes(input_files),
        }
        return previous, input_files, manifest

    def _run_stage(self, stage: Stage, context: StageContext) -> None:
        """Run one stage, or skip it if complete and unchanged. The caller holds its lock (see `run`)."""
        self._clear_leftovers(stage)
        previous, input_files, manifest = self._state(stage, context)
        reason, outputs = self.rerun_reason(stage, previous, manifest)
        if reason is None:
            console.info("stage %s: skipped, complete and unchanged (%s)", stage.name, stage.output)
            self.skipped.append(stage.name)
            self._remember(stage, outputs)
            if input_files != previous["input_files"] or outputs != previous["outputs"]:
                write_record(
                    self.layout.stage_record(stage.name), {**previous, "input_files": input_files, "outputs": outputs}
                )  # refreshed file times
            return
        console.info("stage %s: start (%s)", stage.name, reason)
        start_server()  # for the stages whose work runs in a process of its own: its imports overlap this stage
        if self.verify == "fast":
            self._rehash_run_files(input_files)
        require_free_space(self.layout.root, stage.needed_bytes(context), f"the {stage.name} stage")
        tmp = self.layout.partial(stage.output)
        tmp.mkdir(parents=True)
        self.current = stage.name
        try:
            with measure() as measured:
                summary = stage.work(context, tmp)
            publish_dir(tmp, stage.output)
        except Exception as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            raise InputError(describe_write_failure(failure, self.layout.root, f"the {stage.name} stage")) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if "process" in summary:  # the stage's work ran in a process of its own: its memory is that process's
            measured.update({key: summary["process"][key] for key in MEMORY if key in summary["process"]})
        outputs = file_records(stage.output, relative_to=self.layout.root, skip=OUTPUT_NOT_CONTENT)
        self._remember(stage, outputs)
        record = {
            "stage": stage.name,
            "kind": stage.kind,
            "finished": time.time(),
            "measures": measured,
            "summary": summary,
            "manifest": manifest,
            "input_files": input_files,
            "outputs": outputs,
        }
        write_record(self.layout.stage_record(stage.name), record)
        self.current = None
        console.info(
            "stage %s: done in %.1f s, peak RSS %.0f MB", stage.name, measured["seconds"], measured["peak_rss_mb"]
        )

    def rerun_reason(
        self, stage: Stage, previous: dict | None, manifest: dict, forced: bool = True
    ) -> tuple[str | None, dict]:
        """Why the stage must run (None when its recorded result still stands), and its outputs' records.
        `forced`: whether --force counts."""
        if forced and (self.force & {stage.kind, stage.name}):
            return f"--force {min(self.force & {stage.kind, stage.name})}", {}
        if previous is None:
            return "not run before", {}
        for part, what in (
            ("settings", "settings changed"),
            ("versions", "library versions changed"),
            ("inputs", "inputs changed"),
        ):
            if previous["manifest"][part] != manifest[part]:
                return what, {}
        recorded = previous["outputs"]
        known = recorded if self.verify == "fast" else {}
        current = (
            file_records(stage.output, known, self.layout.root, skip=OUTPUT_NOT_CONTENT)
            if stage.output.is_dir()
            else {}
        )
        if hashes(current) != hashes(recorded):
            return "outputs missing or modified", {}
        return None, current

    def _records(self, paths: tuple[Path, ...], previous: dict[str, dict]) -> dict[str, dict]:
        """File records of `paths`, hashing only what this run has not (with verify: fast, what changed)."""
        known = {**previous, **self.files} if self.verify == "fast" else self.files
        records: dict[str, dict] = {}
        for path in paths:
            records.update(file_records(path, known, relative_to=self.layout.root))
        self.files.update(records)
        return records

    def _rehash_run_files(self, input_files: dict[str, dict]) -> None:
        """Hash again the run directory's files a stage is about to read; refuse any whose bytes changed
        although its size and modification time did not."""
        for name, record in input_files.items():
            if name not in self._producers or name in self._rehashed:
                continue
            if sha256(self.layout.root / name) != record["sha256"]:
                producer = self._producers[name]
                raise InputError(
                    f"{self.layout.root / name}: its bytes changed after the {producer} stage wrote it, although "
                    "its size and modification time did not (a failing disk, or an edit that kept the time); "
                    f"re-run that stage: qlora-requant run CONFIG --force {producer}"
                )
            self._rehashed.add(name)

    def _clear_leftovers(self, stage: Stage) -> None:
        """Remove what an interrupted job left of the stage. The caller holds the stage's lock."""
        for leftover in self.layout.stage_leftovers(stage.name, stage.output):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def _remember(self, stage: Stage, outputs: dict[str, dict]) -> None:
        """The stage's outputs, as later stages will find them among their inputs."""
        self.files.update(outputs)
        self._producers.update(dict.fromkeys(outputs, stage.name))

    def _remove_unplanned(self, record_path: Path) -> None:
        """Forget a stage the plan no longer has (a variant or a scored model removed from the config): delete its
        record and the files it wrote (with the model card the report wrote beside them), and the folders left
        empty. Anything else in its folder is kept, and so is a stage another job is running now."""
        lock = self.locks.stage_file(record_path.stem)
        if not lock.acquire(wait=False):
            console.info("stage %s: no longer in the plan, but another job is running it; left as is", record_path.stem)
            return
        try:
            self._remove_stage(record_path)
        finally:
            lock.release()

    def _remove_stage(self, record_path: Path) -> None:
        try:
            record = read_record(record_path)
        except RecordError:
            record = {"outputs": {}}
        written = [self.layout.root / name for name in record.get("outputs", {})]
        folders = {path.parent for path in written}
        cards = [folder / name for folder in folders for name in OUTPUT_NOT_CONTENT]
        for path in [*written, *cards]:
            path.unlink(missing_ok=True)
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
            while folder != self.layout.root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        record_path.unlink()
        if written:
            folder = self.layout.relative(Path(os.path.commonpath([path.parent for path in written])))
            console.info("stage %s: no longer in the plan; removed what it wrote (%s)", record_path.stem, folder)

    def _previous_record(self, stage: Stage) -> dict | None:
        path = self.layout.stage_record(stage.name)
        if not path.is_file():
            return None
        try:
            return read_record(path)
        except RecordError as exc:
            console.warning("%s: the %s stage runs again", exc, stage.name)
            return None
