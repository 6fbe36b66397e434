"""run.json, the record that makes a folder a run of this tool, and the test of whether a folder is one.

A folder is a run only when its run.json is this tool's (it names the tool and the record's format) and
what the tool keeps beside it has the shape the tool gives it (stages/ a folder of stage records). Any
other folder, even one holding a run.json or a merged/ of another tool, is refused and left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_requant.pipeline.files import write_atomically
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.quant.errors import InputError

TOOL = "qlora-requant"
RUN_FORMAT = 1  # the layout of a run directory; a newer one is refused by an older tool


def write_run_record(layout: RunLayout, record: dict, tool_version: str) -> None:
    """Write run.json: `record` (config, device, versions, stages, warnings) under the tool's marker."""
    marked = {"tool": TOOL, "tool_version": tool_version, "run_format": RUN_FORMAT, **record}
    write_atomically(layout.run_record, json.dumps(marked, indent=2) + "\n")


def read_run_record(layout: RunLayout) -> dict:
    """The run's record, or InputError saying why the folder is not a run of this tool."""
    record = _marked_record(layout.run_record)
    if record.get("run_format", RUN_FORMAT) > RUN_FORMAT:
        raise InputError(
            f"{layout.run_record}: written by qlora-requant {record.get('tool_version', '?')} (run format "
            f"{record['run_format']}), newer than this one; use that version, or another output_dir"
        )
    return record


def require_run(layout: RunLayout) -> None:
    """Refuse a folder with a run.json that is not a run of this tool (see the module note)."""
    read_run_record(layout)
    records = layout.stage_records
    if records.exists() and not records.is_dir():
        raise InputError(f"{records}: not a folder of stage records, so {layout.root} is {_NOT_A_RUN}")
    for path in sorted(records.glob("*.json")) if records.is_dir() else ():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # damaged by the disk or an edit: the executor re-runs that stage
        if not isinstance(record, dict) or "stage" not in record:
            raise InputError(f"{path}: not a qlora-requant stage record, so {layout.root} is {_NOT_A_RUN}")


_NOT_A_RUN = "not a qlora-requant run; give a new or empty folder, or the output_dir of a run"


def _marked_record(path: Path) -> dict:
    """run.json as JSON, when it carries this tool's marker. Runs written before the marker existed are
    recognised by their library versions, which name this tool."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing, so {path.parent} is {_NOT_A_RUN}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({type(exc).__name__}), so {path.parent} is {_NOT_A_RUN}") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: not a qlora-requant run record, so {path.parent} is {_NOT_A_RUN}")
    legacy = "tool" not in record and isinstance(record.get("versions"), dict) and TOOL in record["versions"]
    if record.get("tool") != TOOL and not legacy:
        raise InputError(f"{path}: written by another tool, so {path.parent} is {_NOT_A_RUN}")
    if not isinstance(record.get("run_format", RUN_FORMAT), int):
        raise InputError(f"{path}: run_format is not a number, so {path.parent} is {_NOT_A_RUN}")
    return record
