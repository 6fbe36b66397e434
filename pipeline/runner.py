"""One run, read top to bottom: preflight, take the run directory, run the planned stages, write the report.

with Run(config, force, kinds, models) as run:
    run.setup()     # every input check (preflight), then the run directory: leftovers cleared, run.json, run.log
    run.execute()   # the stages plan(config) lists (those of `kinds` and `models`), through the StageExecutor
    report = run.save()  # None unless this job writes the report

Several jobs may work on one run directory at once (a scheduler's job array: one model each), each running
its own stages: stages are locked one by one (see lock.py), not the whole directory.
"""

from __future__ import annotations

import logging
import platform
from contextlib import ExitStack
from importlib.metadata import version

from qlora_requant.eval.schema import Report
from qlora_requant.pipeline import console as console_output
from qlora_requant.pipeline.config import RunConfig
from qlora_requant.pipeline.console import LibraryOutput, console
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.executor import StageExecutor
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.plan import KIND_GROUPS, MODEL_KINDS, REPORT_STEP, STAGE_KINDS, Stage, job_models, plan
from qlora_requant.pipeline.preflight import preflight, resolve_device
from qlora_requant.pipeline.run_record import write_run_record
from qlora_requant.pipeline.stages.report import write_reports
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)

LIBRARIES = (
    "qlora-requant",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "gptqmodel",
    "safetensors",
    "datasets",
    "accelerate",
    "optimum",
    "lm-eval",
)


def library_versions() -> dict[str, str]:
    """The versions of this tool, the libraries whose code computes its results, and Python: a change of any re-runs
    every stage (see the executor)."""
    return {**{name: version(name) for name in LIBRARIES}, "python": platform.python_version()}


class Run:
    """preflight -> stages (dequantize, merge, requantize, reference, score) -> report, for one RunConfig.

    `kinds`: the kinds of stage to run, and REPORT_STEP (default: every kind); `models`: the models whose own stages
    (MODEL_KINDS) to run, by name or by index in job_models (default: all)."""

    def __init__(
        self,
        config: RunConfig,
        force: set[str] | None = None,
        kinds: frozenset[str] | None = None,
        models: list[str] | None = None,
    ):
        self.config = config
        self.layout = RunLayout(config.output_dir)
        self.kinds = frozenset(STAGE_KINDS) if kinds is None else kinds
        self.models = models
        self.stages: list[Stage] = []  # every stage of the plan
        self.chosen: list[Stage] = []  # the stages this job runs
        self.executed: list[str] = []  # the stages run (or skipped as complete) in this invocation
        forced = {kind for name in force or () for kind in KIND_GROUPS.get(name, (name,))}
        self.executor = StageExecutor(self.layout, library_versions(), forced, config.verify)
        self.context: StageContext | None = None
        self._held = ExitStack()  # given back on exit: the standard streams, the upstream stages' locks, the log
        self._step = "the input checks"  # what the run is doing outside a stage, for an interruption's message

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self._held.close()

    def setup(self) -> None:
        """Check every input, then take the run directory: clear what interrupted jobs left, mark it a run."""
        config, layout = self.config, self.layout
        library_output = self._held.enter_context(LibraryOutput())
        self.stages = plan(config)
        self.chosen = self._choose()
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
        self.executor.require_complete(self._upstream(), self.context, self._held)
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"output_dir {layout.root}: cannot be created ({exc.strerror}); choose another") from None
        with self.executor.locks.run():
            for leftover in layout.run_leftovers():
                leftover.unlink()
            if not layout.run_record.is_file():  # marks the folder as a run; a finished run's record stays until
                self._write_run_record()  # this run finishes, so that a failed re-run leaves it reportable
        self.executor.clear_leftovers(self.stages)
        self._held.callback(console_output.stop_logging, console_output.log_to(layout.log))
        library_output.into(layout.log)
        console.info("run %s on %s: %s", layout.root, device, ", ".join(stage.name for stage in self.chosen))

    def execute(self) -> None:
        """Run the chosen stages in order, skipping those already complete and unchanged."""
        self._step = "the stages' bookkeeping"
        self.executor.run(self.chosen, self.context, self.stages)
        self.executed = [stage.name for stage in self.chosen]
        with self.executor.locks.run():
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

    def _choose(self) -> list[Stage]:
        """The stages of the plan this job runs: those of `kinds`, and of MODEL_KINDS only those of `models`."""
        if self.models is None:
            return [stage for stage in self.stages if stage.kind in self.kinds]
        names = job_models(self.stages)
        if not self.kinds & set(MODEL_KINDS):
            raise InputError(
                f"--models chooses the {' and '.join(MODEL_KINDS)} stages of some models; --stages "
                f"{','.join(sorted(self.kinds))} has none: add {MODEL_KINDS[-1]} (or {MODEL_KINDS[0]}) to --stages"
            )
        models = {_model_name(model, names) for model in self.models}
        return [
            stage
            for stage in self.stages
            if stage.kind in self.kinds and (stage.kind not in MODEL_KINDS or stage.model in models)
        ]

    def _upstream(self) -> list[Stage]:
        """The stages this job does not run but reads: those whose outputs a chosen stage reads, or (when it
        writes the report alone) every stage; in plan order."""
        if REPORT_STEP in self.kinds:
            return [stage for stage in self.stages if stage not in self.chosen]
        return [
            stage
            for stage in self.stages
            if stage not in self.chosen and any(chosen.reads(stage) for chosen in self.chosen)
        ]

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

    @property
    def writes_report(self) -> bool:
        """Whether this job writes the report: asked to (`--stages report`), or it runs every model's scoring
        (the score kind, without --models)."""
        return REPORT_STEP in self.kinds or ("score" in self.kinds and self.models is None)

    def save(self) -> Report | None:
        """Write report.json, report.md, report.html and the GPTQ model cards, and return the report; or return
        None, when this job does not write it. Waits for another job running a stage the report reads."""
        if not self.writes_report:
            return None
        self._step = "the report"
        with ExitStack() as reading:
            for stage in self.stages:
                reading.enter_context(self.executor.locks.reading(stage.name, reader="the report"))
            with self.executor.locks.run():
                report = write_reports(self.layout)
        log.info("report written; stages skipped as complete: %s", ", ".join(self.executor.skipped) or "none")
        return report


def _model_name(requested: str, names: list[str]) -> str:
    """A model `--models` names, by name or by index in `names` (job_models)."""
    if requested.isdigit():
        if int(requested) < len(names):
            return names[int(requested)]
        listed = ", ".join(f"{index} {name}" for index, name in enumerate(names))
        raise InputError(f"--models {requested}: this run has {len(names)} models ({listed}); give one of them")
    if requested in names:
        return requested
    if requested in ("baseline", "base_nf4"):
        raise InputError(
            f"--models {requested}: the baseline and base_nf4 are scored by the reference stage, which every "
            "model's scoring reads; run it with --stages reference"
        )
    raise InputError(
        f"--models {requested}: not a model of this run; give one of {', '.join(names)}, or its index from 0"
    )
