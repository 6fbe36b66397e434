"""qlora-requant: turn a QLoRA fine-tune into one GPTQ checkpoint, with a quality-loss report.

The Python API (pipeline/api.py): what the `qlora-requant` command does, as functions.

    import qlora_requant

    plan = qlora_requant.validate("release.yaml")
    report = qlora_requant.run("release.yaml", set={"output_dir": "runs/try"})
    print(report.release_candidate, report.gate.passed)

- `run(config, *, set, force, stages, models) -> Report`: run the stages not yet complete and write the report;
- `validate(config, *, set) -> Plan`: check a config and its inputs, writing nothing;
- `load_report(run_dir) -> Report`: a finished run's report.json, typed;
- `rebuild_report(run_dir) -> Report`: write a run's report files again from its saved results.

Bad input raises `InputError` (its message is the one the command line prints before exiting 2); SIGINT or SIGTERM
during a run raises `Interrupted`. The subpackages live in the repository's pipeline/, quant/ and eval/ folders.
Names are imported on first use, so `import qlora_requant` loads neither torch nor the model libraries.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlora_requant.eval.schema import Report
    from qlora_requant.pipeline.api import BnbSetting, Plan, load_report, rebuild_report, run, validate
    from qlora_requant.pipeline.config import RunConfig
    from qlora_requant.pipeline.interrupt import Interrupted
    from qlora_requant.quant.errors import InputError

__all__ = [
    "BnbSetting",
    "InputError",
    "Interrupted",
    "Plan",
    "Report",
    "RunConfig",
    "load_report",
    "rebuild_report",
    "run",
    "validate",
]
_MODULES = {
    "qlora_requant.pipeline.api": ("BnbSetting", "Plan", "load_report", "rebuild_report", "run", "validate"),
    "qlora_requant.eval.schema": ("Report",),
    "qlora_requant.pipeline.config": ("RunConfig",),
    "qlora_requant.pipeline.interrupt": ("Interrupted",),
    "qlora_requant.quant.errors": ("InputError",),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'qlora_requant' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
