"""Stage manifests: what a completed stage read, with which settings and libraries, and what it wrote.

A re-run compares the manifest a stage would have now with the one recorded when it completed;
the stage is skipped when they match and its outputs are still the files it wrote. Files are
identified by SHA-256. A file whose size and modification time equal the recorded ones keeps
its recorded hash, so re-checking a multi-GB checkpoint that nobody touched reads nothing.
Hidden entries and the files layout.NOT_CONTENT names (model cards, gptqmodel's log) are not part
of any stage's inputs or outputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qlora_requant.pipeline.layout import NOT_CONTENT

CHUNK = 1 << 24


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(
    folder_or_file: Path,
    known: dict[str, dict] | None = None,
    relative_to: Path | None = None,
    skip: tuple[str, ...] = NOT_CONTENT,
) -> dict[str, dict]:
    """{path: {size, mtime_ns, sha256}} for a file or every file under a folder (see the module note).

    Paths are absolute or, for files under `relative_to` (the run directory), relative to it, so that
    a moved run directory keeps its records. `known` holds earlier records: a file whose size and
    mtime are unchanged keeps its hash.
    """
    known = known or {}
    if folder_or_file.is_file():
        paths = [folder_or_file]
    else:
        paths = sorted(
            p
            for p in folder_or_file.rglob("*")
            if p.is_file() and p.name not in skip and not p.relative_to(folder_or_file).parts[0].startswith(".")
        )
    records = {}
    for path in paths:
        stat = path.stat()
        record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        name = str(path.relative_to(relative_to) if relative_to and path.is_relative_to(relative_to) else path)
        previous = known.get(name, {})
        same_stat = previous.get("size") == stat.st_size and previous.get("mtime_ns") == stat.st_mtime_ns
        record["sha256"] = previous["sha256"] if same_stat else sha256(path)
        records[name] = record
    return records


def hashes(records: dict[str, dict]) -> dict[str, str]:
    """The part of file records that identifies content: {path: sha256}."""
    return {path: record["sha256"] for path, record in records.items()}
