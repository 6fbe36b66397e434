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
from qlora_requant.pipeline.plan import KIND_GROUPS, STAGE_KINDS

if TYPE_CHECKING:
    from qlora_requant.eval.schema import Report

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3
INTERRUPT_CODES = (EXIT_SIGINT, EXIT_SIGTERM) = (130, 143)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_FIXTURE = REPO_ROOT / "runs" / "demo-fixture"


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="qlora-requant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qlora-requant {version('qlora-requant')}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run every stage of a config, skipping those complete and unchanged"),
        ("validate", "check a config and exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", type=Path)
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override one config key (repeatable); the value is read as YAML",
        )
        if name == "run":
            command.add_argument(
                "--stages",
                type=_stage_kinds,
                action="append",
                default=None,
                metavar="KIND[,KIND...]",
                help=f"run only these kinds of stage ({', '.join(STAGE_KINDS)}; evaluate: reference and score; "
                "repeatable, joined); the stages whose outputs they read must be complete and unchanged. The "
                "report is written when every model is scored",
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
    report = commands.add_parser("report", help="rebuild a run's report files from its saved results")
    report.add_argument("run_dir", type=Path)
    demo = commands.add_parser("demo", help="build the offline demo fixture if needed and run configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def _stage_kinds(value: str) -> frozenset[str]:
    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in (*STAGE_KINDS, *KIND_GROUPS)]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"{unknown[0] if unknown else value!r} is not a stage; give one or more of "
            f"{', '.join([*STAGE_KINDS, *KIND_GROUPS])}, separated by commas"
        )
    return frozenset(kind for name in kinds for kind in KIND_GROUPS.get(name, (name,)))


def _load(config_path: Path, overrides: list[str]):
    """The validated config, with the network policy it calls for in place."""
    from qlora_requant.pipeline.config import load_config

    config = load_config(config_path, overrides)
    _network_policy(config)  # before transformers and datasets are imported: they read it once
    return config


def _run(config_path: Path, overrides: list[str], force: list[str], kinds: list[frozenset[str]] | None = None) -> int:
    config = _load(config_path, overrides)
    console.console.info("%s: checking the inputs (base, adapter, tokenizer, data) after loading torch", config_path)
    from qlora_requant.pipeline.runner import Run

    run = Run(config, set(force), frozenset().union(*kinds) if kinds else None)
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
        print(f"\nStages done: {', '.join(run.executed)}; the report is written when every model is scored.")
        return EXIT_OK
    return _print_report(report, run.layout.root)


def _validate(config_path: Path, overrides: list[str]) -> int:
    from qlora_requant.pipeline.console import LibraryOutput
    from qlora_requant.pipeline.plan import plan
    from qlora_requant.pipeline.preflight import preflight, resolve_device

    config = _load(config_path, overrides)
    plan(config)  # refuses what only the plan can judge (evaluation.models)
    with LibraryOutput():
        preflight(config, resolve_device(config))
    print(f"{config_path}: valid; output_dir {config.output_dir}")
    return EXIT_OK


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
    """Rebuild a run's reports under its lock, so that they never mix with a run in progress."""
    from qlora_requant.pipeline.layout import RunLayout
    from qlora_requant.pipeline.lock import RunLock
    from qlora_requant.pipeline.run_record import require_run
    from qlora_requant.pipeline.stages.report import write_reports
    from qlora_requant.quant.errors import InputError

    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; give the output_dir of a run")
    require_run(layout)  # checked before taking the lock, which would leave a .lock behind
    lock = RunLock(layout.lock)
    lock.acquire()
    try:
        return _print_report(write_reports(layout), run_dir)
    finally:
        lock.release()


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
            return _validate(args.config, args.overrides)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "demo":
            from qlora_requant.pipeline.console import LibraryOutput
            from qlora_requant.pipeline.demo import build_fixture

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            with LibraryOutput():  # the fixture's own progress lines only
                build_fixture(DEMO_FIXTURE)
            return _run(DEMO_CONFIG, args.overrides, [])
        return _run(args.config, args.overrides, args.force, args.stages)
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
