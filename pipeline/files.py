"""Files that appear only complete: atomic writes, fsynced stage folders, a free-space check, and what a
failed write means."""

from __future__ import annotations

import errno
import os
import re
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


# Why a write fails where the fault is the disk's, not the tool's: what happened, and what to do.
WRITE_FAILURES = {
    errno.ENOSPC: ("the disk filled up", "free some space or choose an output_dir on a larger disk"),
    errno.EDQUOT: ("the disk quota ran out", "free some of your quota or choose an output_dir elsewhere"),
    errno.EFBIG: (
        "a file grew past the file-size limit",
        "raise the limit (ulimit -f, or the file system's), or set a smaller max_shard_size",
    ),
    errno.EROFS: ("the file system became read-only", "remount it writable or choose another output_dir"),
    errno.EIO: ("the disk failed to write (I/O error)", "check the disk (dmesg) or choose an output_dir on another"),
}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report one


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError of a failed write (one of WRITE_FAILURES) behind `exc`, looking through its causes and
    through errors of native libraries that carry the error number in their message only; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES:
            return exc
        found = _OS_ERROR_IN_TEXT.search(str(exc))
        if found and int(found.group(1)) in WRITE_FAILURES:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_write_failure(failure: OSError, where: Path | str, during: str) -> str:
    """One message for a failed write: the path, what happened and its cause, what to do."""
    what, advice = WRITE_FAILURES[failure.errno]
    path = failure.filename or where
    return f"{path}: {what} during {during} ([Errno {failure.errno}] {failure.strerror}); {advice}, then run again"
