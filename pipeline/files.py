"""Files that appear only complete: atomic writes, fsynced stage folders, a free-space check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlora_requant.quant.errors import InputError


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Write a text file that readers see either whole or not at all (temporary file, fsync, rename)."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
    fsync_path(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a completed folder into place, replacing an older one, after flushing every file in it.

    A crash at any moment leaves at `final` the old folder, the new one, or (between the two
    renames) nothing, never a mix; a hidden `.<name>.old` or temporary folder left behind is
    removed by the next run, which redoes the stage since its record was deleted before it began.
    """
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def require_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse, before writing, when `folder`'s file system has less room than `needed_bytes` (+5%)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.05:
        raise InputError(
            f"{folder}: {_size(free)} free, but {what} needs about {_size(needed_bytes)}; "
            "free some space or choose an output_dir on a larger disk"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
