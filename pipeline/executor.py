"""Running planned stages in a run directory: skip what is done, publish outputs whole, record everything.

Each completed stage leaves a record in RUN_DIR/stages/ with its manifest (the settings it used,
the hashes of the files it read, the library versions) and the hashes of what it wrote. A stage is
skipped when its manifest still matches and its outputs are intact, so a run killed at any moment
and started again redoes only the unfinished work. Stage outputs are written into a temporary
folder and renamed into place only when complete. The caller holds the run directory's lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

from qlora_requant.pipeline.console import console
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.files import publish_dir, require_free_space, write_atomically
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.manifest import file_records, hashes
from qlora_requant.pipeline.metrics import measure
from qlora_requant.pipeline.plan import Stage

log = logging.getLogger(__name__)


class StageExecutor:
    """Runs stages in order in one run directory, skipping each that is complete and unchanged."""

    def __init__(self, layout: RunLayout, versions: dict[str, str], force: set[str] | frozenset[str] = frozenset()):
        self.layout = layout
        self.versions = versions  # library versions: a change re-runs every stage
        self.force = force  # stage kinds to re-run anyway
        self.files: dict[str, dict] = {}  # every file hashed in this run, by recorded name: each is read once
        self.skipped: list[str] = []

    def run(self, stages: list[Stage], context: StageContext) -> None:
        """Run `stages` in order; forget records of stages the plan no longer has."""
        self.layout.stage_records.mkdir(exist_ok=True)
        planned = {stage.name for stage in stages}
        for record in self.layout.stage_records.glob("*.json"):
            if record.stem not in planned:
                record.unlink()
        for stage in stages:
            self.run_stage(stage, context)

    def run_stage(self, stage: Stage, context: StageContext) -> None:
        previous = self._previous_record(stage)
        known = {**self.files, **(previous["input_files"] if previous else {})}
        input_files: dict[str, dict] = {}
        for path in stage.inputs:
            input_files.update(file_records(path, known, relative_to=self.layout.root))
        self.files.update(input_files)
        manifest = {
            "settings": {**stage.settings, "device": context.device},
            "versions": self.versions,
            "inputs": hashes(input_files),
        }
        reason = self.rerun_reason(stage, previous, manifest)
        if reason is None:
            console.info("stage %s: skipped, complete and unchanged (%s)", stage.name, stage.output)
            self.skipped.append(stage.name)
            return
        console.info("stage %s: start (%s)", stage.name, reason)
        require_free_space(self.layout.root, stage.needed_bytes(context), f"the {stage.name} stage")
        self.layout.stage_record(stage.name).unlink(missing_ok=True)
        tmp = self.layout.partial(stage.output)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with measure() as measured:
                summary = stage.work(context, tmp)
            publish_dir(tmp, stage.output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        outputs = file_records(stage.output, relative_to=self.layout.root)
        self.files.update(outputs)
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
        write_atomically(self.layout.stage_record(stage.name), json.dumps(record, indent=1) + "\n")
        console.info(
            "stage %s: done in %.1f s, peak RSS %.0f MB", stage.name, measured["seconds"], measured["peak_rss_mb"]
        )

    def rerun_reason(self, stage: Stage, previous: dict | None, manifest: dict) -> str | None:
        """Why the stage must run, or None when its recorded result still stands."""
        if stage.kind in self.force:
            return f"--force {stage.kind}"
        if previous is None:
            return "not run before"
        for part, what in (
            ("settings", "settings changed"),
            ("versions", "library versions changed"),
            ("inputs", "inputs changed"),
        ):
            if previous["manifest"][part] != manifest[part]:
                return what
        recorded = previous["outputs"]
        current = file_records(stage.output, recorded, self.layout.root) if stage.output.is_dir() else {}
        if hashes(current) != hashes(recorded):
            return "outputs missing or modified"
        return None

    def _previous_record(self, stage: Stage) -> dict | None:
        path = self.layout.stage_record(stage.name)
        previous = json.loads(path.read_text()) if path.is_file() else None
        if previous is not None and "summary" not in previous:
            return None  # written by an older version of this tool: not a record to trust
        return previous
