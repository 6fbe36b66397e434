"""One run at a time per run directory: an exclusive lock that dies with its process."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)


class RunLock:
    """An exclusive `flock` on the run directory's lock file (RunLayout.lock), holding the owner's pid and host.

    The kernel releases the lock when the owning process ends, however it ends (SIGKILL
    included), so a lock file left by a dead run is stale by construction and is simply taken over.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def acquire(self) -> None:
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(file)
            file.close()
            raise InputError(
                f"{self.path.parent}: another qlora-requant run is using this output_dir "
                f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}); wait for it to "
                "finish or choose another output_dir"
            ) from None
        previous = _read_owner(file)
        if previous:
            log.info("lock: taking over from a run that ended without releasing it (pid %s)", previous.get("pid"))
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read_owner(file) -> dict:
    file.seek(0)
    try:
        return json.loads(file.read() or "{}")
    except json.JSONDecodeError:
        return {}
