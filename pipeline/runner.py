"""One run, read top to bottom: preflight, take the run directory, run the planned stages, write the report.

with Run(config, force, kinds) as run:
    run.setup()     # every input check (preflight), then the lock, leftovers cleared, run.json, run.log
    run.execute()   # the stages plan(config) lists (those of `kinds`), through the StageExecutor
    report = run.save()  # None until the evaluation is complete
"""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from importlib.metadata import version

from qlora_requant.eval.schema import Report
from qlora_requant.pipeline import console as console_output
from qlora_requant.pipeline.config import RunConfig
from qlora_requant.pipeline.console import LibraryOutput, console
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.executor import StageExecutor
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.lock import RunLock
from qlora_requant.pipeline.plan import KIND_GROUPS, STAGE_KINDS, Stage, plan
from qlora_requant.pipeline.preflight import preflight, resolve_device
from qlora_requant.pipeline.run_record import write_run_record
from qlora_requant.pipeline.stages.report import write_reports
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)

LIBRARIES = ("qlora-requant", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "safetensors", "datasets")


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}


class Run:
    """preflight -> stages (dequantize, merge, requantize, reference, score) -> report, for one RunConfig."""

    def __init__(self, config: RunConfig, force: set[str] | None = None, kinds: frozenset[str] | None = None):
        self.config = config
        self.layout = RunLayout(config.output_dir)
        self.kinds = frozenset(STAGE_KINDS) if kinds is None else kinds  # the kinds of stage to run
        self.stages: list[Stage] = []  # every stage of the plan
        self.executed: list[str] = []  # the stages run (or skipped as complete) in this invocation
        forced = {kind for name in force or () for kind in KIND_GROUPS.get(name, (name,))}
        self.executor = StageExecutor(self.layout, library_versions(), forced, config.verify)
        self.context: StageContext | None = None
        self._held = ExitStack()  # given back on exit: the standard streams, the lock, the log
        self._step = "the input checks"  # what the run is doing outside a stage, for an interruption's message

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self._held.close()

    def setup(self) -> None:
        """Check every input, then take the run directory: lock it, clear what an interrupted run left."""
        config, layout = self.config, self.layout
        library_output = self._held.enter_context(LibraryOutput())
        self.stages = plan(config)
        self._check_forced()
        device = resolve_device(config)
        inputs = preflight(config, device)
        self.context = StageContext(
            device=device,
            layout=layout,
            inputs=inputs,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )
        self.executor.require_complete(self._upstream(), self.context)
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"output_dir {layout.root}: cannot be created ({exc.strerror}); choose another") from None
        lock = RunLock(layout.lock)
        lock.acquire()
        self._held.callback(lock.release)
        for leftover in layout.leftovers([stage.output for stage in self.stages]):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        self._held.callback(console_output.stop_logging, console_output.log_to(layout.log))
        library_output.into(layout.log)
        console.info("run %s on %s: %s", layout.root, device, ", ".join(stage.name for stage in self.stages))
        if not layout.run_record.is_file():  # marks the folder as a run; a finished run's record stays until
            self._write_run_record()  # this run finishes, so that a failed re-run leaves it reportable

    def execute(self) -> None:
        """Run the chosen stages in order, skipping those already complete and unchanged."""
        chosen = [stage for stage in self.stages if stage.kind in self.kinds]
        self._step = "the stages' bookkeeping"
        self.executor.run(chosen, self.context, planned={stage.name for stage in self.stages})
        self.executed = [stage.name for stage in chosen]
        self._write_run_record()

    @property
    def activity(self) -> str:
        """What the run is doing now: the stage it is in, or the step outside any stage."""
        return f"the {self.executor.current} stage" if self.executor.current else self._step

    def _check_forced(self) -> None:
        """--force names stages of this plan, or kinds of stage."""
        names = [stage.name for stage in self.stages]
        unknown = sorted(self.executor.force - {*names, *STAGE_KINDS})
        if unknown:
            raise InputError(
                f"--force {unknown[0]}: not a stage of this run; give a stage as the console names it "
                f"({', '.join(names)}) or a kind of stage ({', '.join([*STAGE_KINDS, *KIND_GROUPS])})"
            )

    def _upstream(self) -> list[Stage]:
        """The stages left out by `kinds` whose outputs a chosen stage reads, in plan order."""
        chosen = [stage for stage in self.stages if stage.kind in self.kinds]
        read = {path for stage in chosen for path in stage.inputs}
        return [stage for stage in self.stages if stage.kind not in self.kinds and stage.output in read]

    def _write_run_record(self) -> None:
        """run.json: the resolved config, device, library versions and stages of this run."""
        run = {
            "config": self.config.model_dump(mode="json"),
            "device": self.context.device,
            "versions": self.executor.versions,
            "stages": [stage.name for stage in self.stages],
            "warnings": self.context.inputs.warnings,
        }
        write_run_record(self.layout, run, self.executor.versions["qlora-requant"])

    def save(self) -> Report | None:
        """Write report.json, report.md, report.html and the GPTQ model card; return the report. Without
        the scoring stages among the chosen kinds, write nothing and return None."""
        if "score" not in self.kinds:
            return None
        self._step = "the report"
        report = write_reports(self.layout)
        log.info("report written; stages skipped as complete: %s", ", ".join(self.executor.skipped) or "none")
        return report
