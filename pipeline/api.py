"""What the `qlora-requant` command does, as Python functions: the command line is a thin layer over these.

    import qlora_requant

    report = qlora_requant.run("configs/demo.yaml", set={"output_dir": "runs/try"})
    print(report.release_candidate, report.gate.passed)

Bad input raises `InputError` with the message the command line prints (and exits 2 with); a signal (Ctrl-C,
a scheduler's SIGTERM) raises `Interrupted`. A release gate that fails is not an error: it is in the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

from pydantic import ValidationError

from qlora_requant.pipeline import console as console_output
from qlora_requant.pipeline.config import ConfigSource, GptqSection, Overrides, RunConfig, load_config
from qlora_requant.pipeline.interrupt import Interrupted, stopping_on_signals
from qlora_requant.pipeline.plan import REPORT_STEP, stage_kinds
from qlora_requant.quant.errors import InputError

if TYPE_CHECKING:
    from qlora_requant.eval.schema import Report

REPORT_JSON = "report.json"


@dataclass(frozen=True)
class BnbSetting:
    """One bitsandbytes setting the baseline loads the base with, and where it comes from."""

    key: str  # quant_type, double_quant, ...
    value: str
    source: str  # config, default (this tool's), or the 4-bit checkpoint


@dataclass(frozen=True)
class Plan:
    """What a valid config will do, as `validate` found it after reading every input."""

    config: RunConfig
    device: str  # where the stages will compute: cpu or cuda
    stages: list[str]  # every stage, in the order they run: merge, requantize_w4g128, ..., score_gptq_w4g128
    models: list[str]  # the models `run(models=...)` can name, in index order (a job array's task indices)
    gptq: dict[str, GptqSection]  # each GPTQ checkpoint's settings, by variant name ("" without variants)
    bnb: list[BnbSetting]  # how the baseline loads the base: the training settings as far as the run knows them
    warnings: list[str]  # what the input checks found worth a look, without refusing the config

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir


def validate(config: ConfigSource, *, set: Overrides = ()) -> Plan:
    """Check a config and read its inputs (base, adapter, tokenizer, data), writing nothing.

    Args:
        config: a YAML file's path (its relative paths are relative to it), a dict of the same sections
            (relative paths from the working directory) or a `RunConfig`.
        set: overrides, as `--set` takes them (`["requantize.bits=3"]`) or as a dict (`{"requantize.bits": 3}`).

    Returns:
        The plan: the stages, the models, the GPTQ checkpoints and the bitsandbytes settings of the baseline.

    Raises:
        InputError: the config or an input it names cannot run; the message names the key or file.
    """
    with console_output.shown():
        resolved = _load(config, set)
        from qlora_requant.pipeline.plan import job_models, plan
        from qlora_requant.pipeline.preflight import preflight, resolve_device, training_settings

        stages = plan(resolved)  # refuses what only the plan can judge (evaluation.models)
        device = resolve_device(resolved)
        with console_output.LibraryOutput():
            inputs = preflight(resolved, device)
        return Plan(
            config=resolved,
            device=device,
            stages=[stage.name for stage in stages],
            models=job_models(stages),
            gptq=resolved.requantize.variant_settings(),
            bnb=[BnbSetting(*setting) for setting in training_settings(resolved, inputs.base)],
            warnings=list(inputs.warnings),
        )


@overload
def run(
    config: ConfigSource, *, set: Overrides = (), force: Iterable[str] = (), stages: None = None, models: None = None
) -> Report: ...


@overload
def run(
    config: ConfigSource,
    *,
    set: Overrides = (),
    force: Iterable[str] = (),
    stages: Iterable[str] | None = None,
    models: Iterable[str | int] | str | int | None = None,
) -> Report | None: ...


def run(
    config: ConfigSource,
    *,
    set: Overrides = (),
    force: Iterable[str] = (),
    stages: Iterable[str] | None = None,
    models: Iterable[str | int] | str | int | None = None,
) -> Report | None:
    """Run every stage of a config not already complete and unchanged, then write and return the report.

    The stages' model work runs in processes of its own, which do not import the caller's script: no
    `if __name__ == "__main__":` guard is needed.

    Args:
        config: a YAML file's path, a dict of the same sections or a `RunConfig` (see `validate`).
        set: overrides, as `--set` takes them or as a dict (see `validate`).
        force: stages to re-run even if complete: names as the console prints them (merge, requantize_w4g128,
            score_gptq_w4g128, ...) or kinds (every stage of it: dequantize, merge, requantize, reference, score,
            evaluate).
        stages: run only these kinds of stage (and "report": write the report from complete stages), as a
            scheduler's step does; the stages they read must be complete and unchanged.
        models: run the requantize and score stages of these models only (names, or indices in `Plan.models`);
            other jobs may work on the same output_dir at once.

    Returns:
        The report (as written to report.json), whether or not the release gates pass (`report.gate.passed`).
        None for a job that writes no report: one narrowed by `models`, or whose `stages` hold neither score nor
        report.

    Raises:
        InputError: bad input (config, paths, checkpoints, adapter, data), found before any stage runs where it can
            be; nothing half-written is kept. The message is the command line's.
        Interrupted: SIGINT or SIGTERM (in the main thread); completed stages stand, and the same call resumes.
    """
    with console_output.shown(), stopping_on_signals(), _write_failures_as_input_errors("run"):
        kinds = stage_kinds(_listed(stages)) if stages is not None else None
        resolved = _load(config, set)
        where = config if isinstance(config, (str, os.PathLike)) else "the config"
        console_output.console.info(
            "%s: checking the inputs (base, adapter, tokenizer, data) after loading torch", where
        )
        from qlora_requant.pipeline.runner import Run

        job = Run(resolved, {*_listed(force)}, kinds, None if models is None else _listed(models))
        try:
            with job:
                job.setup()
                job.execute()
                report = job.save()
        except Interrupted as exc:
            exc.activity = job.activity
            raise
        if report is None:
            console_output.console.info(
                "Stages done: %s; the report is written by a job with --stages %s once every model is scored (or by "
                "one scoring them all)",
                ", ".join(job.executed) or "none",
                REPORT_STEP,
            )
        return report


def load_report(run_dir: str | os.PathLike) -> Report:
    """The report of a run, as its report.json holds it, validated.

    Args:
        run_dir: the run's output_dir (or its report.json).

    Returns:
        The report; `report.run_dir` is the folder it was read from.

    Raises:
        InputError: there is no report, or it is not one this version reads; the message says how to rebuild it.
    """
    from qlora_requant.eval.schema import SCHEMA_VERSION, Report

    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / REPORT_JSON
    rebuild = f"rebuild it with `qlora-requant report {path.parent}`"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no report there; {rebuild} once every stage is complete") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}); {rebuild}") from None
    try:
        return Report.model_validate_json(text).located(path.parent)
    except ValidationError as exc:
        version = _schema_version(text)
        if version is not None and version != SCHEMA_VERSION:
            raise InputError(
                f"{path}: a report of schema version {version}, and this qlora-requant reads version "
                f"{SCHEMA_VERSION}; {rebuild}"
            ) from None
        raise InputError(f"{path}: not a valid report ({exc.errors()[0]['msg']}); {rebuild}") from None


def rebuild_report(run_dir: str | os.PathLike) -> Report:
    """Rebuild a run's report files (report.json, .md, .html, the model cards) from its saved results, loading no
    model; the release gates are judged again from run.json's config. Refused while a job runs one of its stages.

    Args:
        run_dir: the run's output_dir.

    Returns:
        The report written.

    Raises:
        InputError: the folder is not a run, a stage's results are missing or changed, or a job is running a stage.
    """
    from contextlib import ExitStack

    from qlora_requant.pipeline.layout import RunLayout
    from qlora_requant.pipeline.lock import RunLocks
    from qlora_requant.pipeline.run_record import read_run_record, require_run
    from qlora_requant.pipeline.stages.report import write_reports

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; give the output_dir of a run")
    with console_output.shown(), _write_failures_as_input_errors("report"):
        require_run(layout)  # checked before taking a lock, which would leave a .locks/ behind
        locks = RunLocks(layout)
        with ExitStack() as reading:
            for stage in read_run_record(layout).get("stages", []):
                lock = locks.stage_file(stage, shared=True)
                if not lock.acquire(wait=False):
                    raise InputError(
                        f"{run_dir}: the {stage} stage is running in another job ({lock.holder() or 'not named'}); "
                        "run `qlora-requant report` when it has finished"
                    )
                reading.callback(lock.release)
            with locks.run():
                return write_reports(layout)


def _listed(names: Iterable[str | int] | str | int) -> list[str]:
    """Names given as one or several (`force="merge"` is one stage, not five letters; `models=1` one index)."""
    return [str(names)] if isinstance(names, (str, int)) else [str(name) for name in names]


def _load(config: ConfigSource, overrides: Overrides) -> RunConfig:
    """The validated config, with the network policy it calls for in place."""
    resolved = load_config(config, overrides)
    _network_policy(resolved)  # before transformers and datasets are imported: they read it once
    return resolved


def _network_policy(config: RunConfig) -> None:
    """Offline unless the config names a hub dataset: the hub is never asked for anything else."""
    hub = [
        f"{key}.dataset"
        for key, source in (
            ("requantize.calibration", config.requantize.calibration),
            ("evaluation.text", config.evaluation.text),
        )
        if source.dataset
    ] + [f"evaluation.tasks.{i}.name" for i, task in enumerate(config.evaluation.tasks) if task.name]
    if not hub:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        raise InputError(
            f"{hub[0]} names a hub dataset, but HF_HUB_OFFLINE is set; unset it to download, or give a local file as "
            "path"
        )


def _schema_version(text: str) -> object:
    try:
        return json.loads(text).get("schema_version")
    except (ValueError, AttributeError):
        return None


@contextmanager
def _write_failures_as_input_errors(command: str) -> Iterator[None]:
    """A write the disk refused outside a stage (records, reports, locks) as the InputError the CLI reports: the
    stages report their own."""
    from qlora_requant.pipeline.files import describe_write_failure, write_failure

    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise InputError(describe_write_failure(failure, "a file", f"qlora-requant {command}")) from exc
