"""The locks that let several jobs work on one run directory at once, each on its own stages.

Every stage has a lock (RunLayout.stage_lock). A job holds it exclusive while it checks, runs or publishes
that stage, and shared while it reads the stage's output: while a stage of its own reads it, for the whole
job when the stage is upstream of those it was asked to run (`--stages`), and while the report is written.
So two jobs never run one stage at once, and no job replaces an output another job is reading. The run
lock (RunLayout.run_lock) is held, briefly, for what every job writes: run.json, the reports, and the
removal of stages the plan no longer has. A job that needs a lock another job holds waits, and says so on
the console; only the clean-up of leftovers and of unplanned stages skips what is locked, since it would
otherwise delete another job's work in progress.

Locks are `flock`s, which the kernel releases when their process ends however it ends (SIGKILL included),
so a lock file left by a dead job is simply taken over. Between nodes they need a file system whose locks
work across clients (NFSv4, Lustre mounted with `-o flock`, GPFS, CephFS).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from qlora_requant.pipeline.console import console
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)


class FileLock:
    """An `flock` on one file: exclusive (one holder, which writes its pid, host and scheduler job into the
    file, for the message of a job that waits) or shared."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = path
        self.shared = shared
        self._file = None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock; when another job holds it, wait for it, or (`wait` False) return False at once."""
        file = self.path.open("a+")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(file, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    file.close()
                    return False
                fcntl.flock(file, mode)
        except OSError as exc:
            file.close()
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise InputError(
                    f"{self.path}: the file system of this output_dir does not support file locks ({exc.strerror}); "
                    "choose an output_dir on one that does (a local disk, NFSv4, Lustre mounted with -o flock, GPFS)"
                ) from None
            raise
        file.seek(0)
        file.truncate()  # what a dead holder wrote; shared holders leave it empty
        if not self.shared:
            file.write(json.dumps(_this_job()))
            file.flush()
        self._file = file
        return True

    def holder(self) -> str:
        """Who holds the lock exclusively, as a console line names them; '' when nobody says (shared holders)."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return ""
        if not owner:
            return ""
        job = f", {owner['job']}" if owner.get("job") else ""
        return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{job}"

    def release(self) -> None:
        if self._file is not None:
            if not self.shared:
                self._file.seek(0)
                self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _this_job() -> dict:
    """This process, as a waiting job's message names it: pid, host, and the scheduler's job if any."""
    owner: dict = {"pid": os.getpid(), "host": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        owner["job"] = f"Slurm job {'_'.join(array) if all(array) else os.environ['SLURM_JOB_ID']}"
    elif os.environ.get("JOB_COMPLETION_INDEX"):
        owner["job"] = f"Kubernetes pod {socket.gethostname()}, index {os.environ['JOB_COMPLETION_INDEX']}"
    return owner


class RunLocks:
    """The locks of one run directory (see the module note)."""

    def __init__(self, layout: RunLayout):
        self.layout = layout

    @contextmanager
    def run(self) -> Iterator[None]:
        """The run lock, exclusive, for run.json, the reports and the removal of unplanned stages."""
        lock = self._lock(self.layout.run_lock)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def stage(self, name: str, reads: list[str] = ()) -> Iterator[None]:
        """Hold the stage `name` exclusive and the stages it `reads` shared, waiting for other jobs, saying so."""
        with ExitStack() as held:
            for read in reads:
                held.enter_context(self.reading(read, reader=f"stage {name}"))
            lock = self._lock(self.layout.stage_lock(name))
            if not lock.acquire(wait=False):
                holder = lock.holder()
                if holder:
                    console.info("stage %s: running in another job (%s); waiting for it to finish", name, holder)
                else:
                    console.info("stage %s: other jobs are reading its output; waiting for them to finish", name)
                lock.acquire()
            held.callback(lock.release)
            yield

    @contextmanager
    def reading(self, name: str, reader: str) -> Iterator[None]:
        """Hold the stage `name` shared while `reader` ("stage score_gptq", "the report") reads its output; wait for a
        job running it, saying so."""
        lock = self._lock(self.layout.stage_lock(name), shared=True)
        if not lock.acquire(wait=False):
            console.info(
                "%s: waiting for the %s stage, which another job is running (%s)",
                reader,
                name,
                lock.holder() or "its holder is not named",
            )
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def stage_file(self, name: str, shared: bool = False) -> FileLock:
        """The stage's lock, not taken: for what never waits (clean-ups, `qlora-requant report`)."""
        return self._lock(self.layout.stage_lock(name), shared)

    def _lock(self, path: Path, shared: bool = False) -> FileLock:
        self.layout.locks.mkdir(parents=True, exist_ok=True)
        return FileLock(path, shared)
