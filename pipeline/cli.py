"""The `qlora-requant` command: run, validate, report, init, demo.

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

from qlora_requant.pipeline.interrupt import Interrupted, stopping_on_signals
from qlora_requant.pipeline.plan import KIND_GROUPS, MODEL_KINDS, REPORT_STEP, STAGE_KINDS, stage_kinds

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
    starter = "write a commented config for a fine-tune from what its base and adapter folders say"
    init = commands.add_parser("init", help=starter, description=starter, epilog=exit_codes)
    init.add_argument("base", type=Path, help="the base model's folder (config.json, weights, tokenizer)")
    init.add_argument("adapter", type=Path, help="the adapter's folder, as the trainer saved it")
    init.add_argument(
        "-o", "--output", type=Path, help="the config file to write (a new one); default: print it", default=None
    )
    demo = commands.add_parser(
        "demo", help="build the offline demo fixture if needed and run configs/demo.yaml", epilog=exit_codes
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def _stage_kinds(value: str) -> frozenset[str]:
    from qlora_requant.quant.errors import InputError

    try:
        return stage_kinds(_names(value))
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--stages: ")) from None


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: give one or more names, separated by commas")
    return names


def _run(
    config: Path,
    overrides: list[str],
    force: list[str],
    kinds: list[frozenset[str]] | None = None,
    models: list[list[str]] | None = None,
) -> int:
    from qlora_requant.pipeline.api import run

    report = run(
        config,
        set=overrides,
        force=force,
        stages=sorted(frozenset().union(*kinds)) if kinds else None,
        models=[model for group in models for model in group] if models else None,
    )
    return EXIT_OK if report is None else _print_report(report)  # without a report, the run said why


def _validate(config: Path, overrides: list[str], list_models: bool = False) -> int:
    from qlora_requant.pipeline.api import validate

    plan = validate(config, set=overrides)
    if list_models:
        print("\n".join(plan.models))
        return EXIT_OK
    print(f"{config}: valid; output_dir {plan.output_dir}")
    print(f"stages: {', '.join(plan.stages)}")
    print(f"models (--models, by name or index): {', '.join(f'{i} {name}' for i, name in enumerate(plan.models))}")
    print(f"GPTQ: {'; '.join(_gptq_line(name, settings) for name, settings in plan.gptq.items())}")
    settings = ", ".join(f"{setting.key} {setting.value} ({setting.source})" for setting in plan.bnb)
    print(f"baseline, the base as training loaded it (bitsandbytes 4-bit): {settings}")
    return EXIT_OK  # the input checks' warnings are on the console already


def _gptq_line(name: str, settings) -> str:
    """One GPTQ checkpoint the run makes, as `validate` lists it."""
    options = [f"{settings.bits}-bit", f"group {settings.group_size}"]
    options += [option for option, on in (("act-order", settings.desc_act), ("asym", not settings.sym)) if on]
    options += ["GPTAQ"] * settings.gptaq + ([f"dtype {settings.dtype}"] if settings.dtype != "auto" else [])
    return f"{name or 'gptq'} ({', '.join(options)})"


def _report(run_dir: Path) -> int:
    from qlora_requant.pipeline.api import rebuild_report

    return _print_report(rebuild_report(run_dir))


def _init(base: Path, adapter: Path, output: Path | None) -> int:
    from qlora_requant.pipeline.files import write_atomically
    from qlora_requant.pipeline.starter import starter_config
    from qlora_requant.quant.errors import InputError

    if output is not None and (output.exists() or output.is_symlink()):
        raise InputError(f"-o {output}: exists; give a new file (init never overwrites one)")
    if output is not None and not output.parent.is_dir():
        raise InputError(f"-o {output}: its folder {output.parent} does not exist; create it or give another path")
    config = starter_config(base, adapter, None if output is None else output.parent)
    if output is None:
        print(config.text, end="")
    else:
        write_atomically(output, config.text)
    print(
        f"{output or 'The config above'}: fill in {' and '.join(config.fill_in)}; check the values marked GUESSED "
        f"({', '.join(config.guessed)}); then run qlora-requant validate {output or 'CONFIG'}",
        file=sys.stderr,
    )
    return EXIT_OK


def _demo(overrides: list[str]) -> int:
    from qlora_requant.pipeline.console import LibraryOutput, shown
    from qlora_requant.pipeline.demo import build_fixture

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with shown(), LibraryOutput():  # the fixture's own progress lines only
        build_fixture(DEMO_FIXTURE)
    return _run(DEMO_CONFIG, overrides, [])


def _print_report(report: Report) -> int:
    """The quality table and findings on the console; the exit code the release gate calls for."""
    from qlora_requant.eval.report import console_table, model_table, summary_lines

    print()
    print(console_table(model_table(report.models)))
    print()
    print("\n".join(summary_lines(report)))
    print(f"\nReport: {report.run_dir / 'report.md'} and {report.run_dir / 'report.html'}")
    return EXIT_OK if report.gate.passed else EXIT_GATE_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qlora_requant.quant.errors import InputError

    with stopping_on_signals():
        try:
            if args.command == "validate":
                return _validate(args.config, args.overrides, args.list_models)
            if args.command == "report":
                return _report(args.run_dir)
            if args.command == "init":
                return _init(args.base, args.adapter, args.output)
            if args.command == "demo":
                return _demo(args.overrides)
            return _run(args.config, args.overrides, args.force, args.stages, args.models)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Interrupted as exc:
            print(f"\n{exc}", file=sys.stderr)
            return exc.exit_code
        except Exception as exc:  # a write the disk refused outside the API's calls (the demo's fixture)
            from qlora_requant.pipeline.files import describe_write_failure, write_failure

            failure = write_failure(exc)
            if failure is None:
                raise
            message = describe_write_failure(failure, "a file", f"qlora-requant {args.command}")
            print(f"error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT


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
