"""The `qlora-requant` command: run, validate, report, demo.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (config, paths, checkpoints, adapter,
data), nothing half-written; 3 the run finished but the release gate failed; 130 / 143 interrupted by
SIGINT (Ctrl-C) / SIGTERM, resumable by the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_requant.pipeline import console
from qlora_requant.pipeline.interrupt import Interrupted, restore_signals, stop_on_signals
from qlora_requant.pipeline.plan import KIND_GROUPS, MODEL_KINDS, REPORT_STEP, STAGE_KINDS

if TYPE_CHECKING:
    from qlora_requant.eval.schema import Report

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3
INTERRUPT_CODES = (EXIT_SIGINT, EXIT_SIGTERM) = (130, 143)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_FIXTURE = REPO_ROOT / "runs" / "demo-fixture"


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    exit_codes = "exit codes: " + " ".join(__doc__.split("Exit codes: ")[1].split())
    parser = argparse.ArgumentParser(prog="qlora-requant", description=__doc__.splitlines()[0], epilog=exit_codes)
    parser.add_argument("--version", action="version", version=f"qlora-requant {version('qlora-requant')}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run every stage of a config, skipping those complete and unchanged"),
        ("validate", "check a config and exit"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text, epilog=exit_codes)
        command.add_argument("config", type=Path, help="the run's YAML config (configs/demo.yaml is one)")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override one config key (repeatable); the value is read as YAML",
        )
        if name == "validate":
            command.add_argument(
                "--list-models",
                action="store_true",
                help="print only the models --models can name, one a line, in index order (for a job array)",
            )
        if name == "run":
            command.add_argument(
                "--stages",
                type=_stage_kinds,
                action="append",
                default=None,
                metavar="KIND[,KIND...]",
                help=f"run only these kinds of stage ({', '.join(STAGE_KINDS)}; evaluate: reference and score; "
                f"{REPORT_STEP}: write the report; repeatable, joined); the stages whose outputs they read must be "
                "complete and unchanged. The report is written with score (without --models) or report",
            )
            command.add_argument(
                "--models",
                type=_names,
                action="append",
                default=None,
                metavar="MODEL[,MODEL...]",
                help=f"run the {' and '.join(MODEL_KINDS)} stages of these models only (the others' stages are left "
                "to other jobs): a name (merged, gptq_w4g128, ...) or an index from 0, as `validate --list-models` "
                "lists them; several jobs may work on one output_dir at once",
            )
            command.add_argument(
                "--force",
                action="append",
                default=[],
                metavar="STAGE",
                help="re-run a stage even if complete (repeatable): its name as the console prints it "
                f"(merge, requantize_w4g128, score_gptq_w4g128, ...) or a kind, every stage of it "
                f"({', '.join([*STAGE_KINDS, *KIND_GROUPS])})",
            )
    rebuild = "rebuild a run's report files from its saved results"
    report = commands.add_parser("report", help=rebuild, description=rebuild, epilog=exit_codes)
    report.add_argument("run_dir", type=Path, help="the output_dir of a run")
    demo = commands.add_parser(
        "demo", help="build the offline demo fixture if needed and run configs/demo.yaml", epilog=exit_codes
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def _stage_kinds(value: str) -> frozenset[str]:
    kinds = _names(value)
    known = (*STAGE_KINDS, *KIND_GROUPS, REPORT_STEP)
    unknown = [kind for kind in kinds if kind not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{unknown[0]!r} is not a stage; give one or more of {', '.join(known)}, separated by commas"
        )
    return frozenset(kind for name in kinds for kind in KIND_GROUPS.get(name, (name,)))


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: give one or more names, separated by commas")
    return names


def _load(config_path: Path, overrides: list[str]):
    """The validated config, with the network policy it calls for in place."""
    from qlora_requant.pipeline.config import load_config

    config = load_config(config_path, overrides)
    _network_policy(config)  # before transformers and datasets are imported: they read it once
    return config


def _run(
    config_path: Path,
    overrides: list[str],
    force: list[str],
    kinds: list[frozenset[str]] | None = None,
    models: list[list[str]] | None = None,
) -> int:
    config = _load(config_path, overrides)
    console.console.info("%s: checking the inputs (base, adapter, tokenizer, data) after loading torch", config_path)
    from qlora_requant.pipeline.runner import Run

    chosen_models = [model for group in models for model in group] if models else None
    run = Run(config, set(force), frozenset().union(*kinds) if kinds else None, chosen_models)
    try:
        with run:
            run.setup()
            run.execute()
            report = run.save()
    except Interrupted as exc:
        print(
            f"\ninterrupted by {exc.signal_name} during {run.activity}; nothing half-written is kept and completed "
            "stages stand: run the same command again to resume",
            file=sys.stderr,
        )
        return exc.exit_code
    if report is None:
        print(
            f"\nStages done: {', '.join(run.executed) or 'none'}; the report is written by a run with --stages "
            f"{REPORT_STEP} once every model is scored (or by one scoring them all)."
        )
        return EXIT_OK
    return _print_report(report, run.layout.root)


def _validate(config_path: Path, overrides: list[str], list_models: bool = False) -> int:
    from qlora_requant.pipeline.console import LibraryOutput
    from qlora_requant.pipeline.plan import job_models, plan
    from qlora_requant.pipeline.preflight import preflight, resolve_device, training_settings

    config = _load(config_path, overrides)
    stages = plan(config)  # refuses what only the plan can judge (evaluation.models)
    with LibraryOutput():
        inputs = preflight(config, resolve_device(config))
    models = job_models(stages)
    if list_models:
        print("\n".join(models))
        return EXIT_OK
    print(f"{config_path}: valid; output_dir {config.output_dir}")
    print(f"stages: {', '.join(stage.name for stage in stages)}")
    print(f"models (--models, by name or index): {', '.join(f'{i} {name}' for i, name in enumerate(models))}")
    variants = config.requantize.variant_settings()
    print(f"GPTQ: {'; '.join(_gptq_line(name, settings) for name, settings in variants.items())}")
    settings = ", ".join(f"{key} {value} ({source})" for key, value, source in training_settings(config, inputs.base))
    print(f"baseline, the base as training loaded it (bitsandbytes 4-bit): {settings}")
    return EXIT_OK  # the input checks' warnings are on the console already


def _gptq_line(name: str, settings) -> str:
    """One GPTQ checkpoint the run makes, as `validate` lists it."""
    options = [f"{settings.bits}-bit", f"group {settings.group_size}"]
    options += [option for option, on in (("act-order", settings.desc_act), ("asym", not settings.sym)) if on]
    options += ["GPTAQ"] * settings.gptaq + ([f"dtype {settings.dtype}"] if settings.dtype != "auto" else [])
    return f"{name or 'gptq'} ({', '.join(options)})"


def _network_policy(config) -> None:
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
        from qlora_requant.quant.errors import InputError

        raise InputError(
            f"{hub[0]} names a hub dataset, but HF_HUB_OFFLINE is set; unset it to download, or "
            "give a local file as path"
        )


def _report(run_dir: Path) -> int:
    """Rebuild a run's reports under its run lock; refused while a job runs one of its stages, whose results
    would be mixed with the earlier ones."""
    from contextlib import ExitStack

    from qlora_requant.pipeline.layout import RunLayout
    from qlora_requant.pipeline.lock import RunLocks
    from qlora_requant.pipeline.run_record import read_run_record, require_run
    from qlora_requant.pipeline.stages.report import write_reports
    from qlora_requant.quant.errors import InputError

    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; give the output_dir of a run")
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
            return _print_report(write_reports(layout), run_dir)


def _print_report(report: Report, run_dir: Path) -> int:
    """The quality table and findings on the console; the exit code the release gate calls for."""
    from qlora_requant.eval.report import console_table, model_table, summary_lines

    print()
    print(console_table(model_table(report.models)))
    print()
    print("\n".join(summary_lines(report)))
    print(f"\nReport: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return EXIT_OK if report.gate.passed else EXIT_GATE_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.install()
    from qlora_requant.quant.errors import InputError

    stop_on_signals()
    try:
        if args.command == "validate":
            return _validate(args.config, args.overrides, args.list_models)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "demo":
            from qlora_requant.pipeline.console import LibraryOutput
            from qlora_requant.pipeline.demo import build_fixture

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            with LibraryOutput():  # the fixture's own progress lines only
                build_fixture(DEMO_FIXTURE)
            return _run(DEMO_CONFIG, args.overrides, [])
        return _run(args.config, args.overrides, args.force, args.stages, args.models)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"\ninterrupted by {exc.signal_name}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a write the disk refused, outside a stage (records, reports, the lock)
        from qlora_requant.pipeline.files import describe_write_failure, write_failure

        failure = write_failure(exc)
        if failure is None:
            raise
        print(f"error: {describe_write_failure(failure, 'a file', f'qlora-requant {args.command}')}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        restore_signals()


def entry() -> None:
    """The console script: exit with main()'s code; after an interrupt, without waiting for threads a library
    left running (its cleanup, and ours, is done by then)."""
    code = main()
    if code in INTERRUPT_CODES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
