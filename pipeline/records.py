"""Stage records (RUN_DIR/stages/<stage>.json), sealed with a checksum so that a damaged or edited record
is never trusted: a run re-runs its stage, and the report refuses to read it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlora_requant.pipeline.files import write_atomically
from qlora_requant.quant.errors import InputError

CHECKSUM = "checksum"
REQUIRED = ("stage", "kind", "summary", "manifest", "input_files", "outputs")


class RecordError(InputError):
    """A stage record that cannot be trusted: unreadable, incomplete, or changed since it was written."""


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def write_record(path: Path, record: dict) -> None:
    """Write `record` with its checksum, atomically."""
    write_atomically(path, json.dumps({**record, CHECKSUM: _digest(record)}, indent=1) + "\n")


def read_record(path: Path) -> dict:
    """The record at `path`, or RecordError saying what is wrong with it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or any(key not in record for key in (*REQUIRED, CHECKSUM)):
        raise RecordError(f"{path}: not a stage record of this version of qlora-requant")
    checksum = record.pop(CHECKSUM)
    if checksum != _digest(record):
        raise RecordError(f"{path}: changed since the stage wrote it (its checksum does not match)")
    return record
