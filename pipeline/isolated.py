"""A stage's model work in a process of its own: the memory of a 70B model is fully returned when it ends, and a
model may be loaded by the loader it needs (gptqmodel's patches transformers' model classes for the process).

The GPTQ stages and the scoring stages run there. The process is forked from a server that has already imported
torch, transformers and peft (seconds each time otherwise). It writes library output and its own log records to
the run's log, and sends the parent what a person should see (a line, progress) and, at the end, its result or
its error, through a pipe: the parent alone talks to the console. It is killed if the parent is interrupted, and
dies with the server, which ends with the parent, if the parent is killed.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_requant.pipeline.console import LIBRARY_LOGGERS, LOG_FORMAT, console
from qlora_requant.pipeline.files import write_failure
from qlora_requant.pipeline.metrics import measure
from qlora_requant.pipeline.progress import Progress
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)

_SERVER = multiprocessing.get_context("forkserver")
# What every stage process imports anyway; lm_eval (evaluation.tasks) only where it is installed. Not gptqmodel: it
# starts threads at import, which a forked process would not have.
_SERVER.set_forkserver_preload(
    ["torch", "transformers", "peft", "lm_eval", "qlora_requant.pipeline.stages.reference", "qlora_requant.eval.models"]
)
_PR_SET_PDEATHSIG = 1
_server_folder: str | None = None  # the fork server's working directory: empty, its own


class Reporter:
    """What the work in the child process tells the parent's console."""

    def __init__(self, connection):
        self._connection = connection

    def say(self, text: str) -> None:
        """One console line."""
        self._connection.send(("say", text))

    def progress(self, what: str, done: int, total: int, unit: str) -> None:
        self._connection.send(("progress", (what, done, total, unit)))


def start_server() -> None:
    """Start the fork server if it is not running: early in a run, its imports overlap the first stages.

    It starts in an empty folder of its own: it starts as `python -c`, which puts the working directory first on
    sys.path, where a user's random.py or queue.py beside the run would replace the standard library's.
    """
    global _server_folder
    if _server_folder is None:
        _server_folder = tempfile.mkdtemp(prefix="qlora-requant-server-")
        atexit.register(shutil.rmtree, _server_folder, True)
    here = os.getcwd()
    os.chdir(_server_folder)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.chdir(here)


def run_isolated(work: Callable[[dict, Reporter], dict], spec: dict, log_file: Path) -> dict:
    """`work(spec, reporter)` in a fresh process; its result, with `process` (its time and peak memory) added.
    An InputError in the child is raised here as InputError, a failed write as the OSError it was (the caller
    names the stage), any other failure as RuntimeError naming it (its traceback is in `log_file`)."""
    start_server()
    receive, send = _SERVER.Pipe(duplex=False)
    child = _SERVER.Process(target=_child, args=(work, spec, send, str(log_file)), daemon=True)
    with _main_module_left_out():
        child.start()
    send.close()
    bars: dict[str, Progress] = {}
    outcome: tuple[str, object] = ("failure", "the process ended without a result")
    try:
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                break
            if kind == "say":
                console.info("%s", payload)
            elif kind == "progress":
                what, done, total, unit = payload
                if what not in bars:
                    bars[what] = Progress(what, total, unit)
                bars[what].update(done, total)
            else:
                outcome = (kind, payload)
        child.join()
    finally:
        for bar in bars.values():
            bar.close()
        if child.is_alive():
            child.kill()
            child.join()
        receive.close()
    kind, payload = outcome
    if kind == "done":
        return payload
    if kind == "input":
        raise InputError(payload)
    if kind == "write":
        raise OSError(*payload)
    code = child.exitcode
    ended = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
    raise RuntimeError(f"{payload} ({ended}; see {log_file})")


@contextmanager
def _main_module_left_out() -> Iterator[None]:
    """Start a process without the caller's main module: multiprocessing would import it in the child (from its
    __spec__ or __file__) to find what the target needs, but every target here is this package's, and a user's script
    imported again would run its top-level code, a call to `qlora_requant.run` among it, in each stage process."""
    main = sys.modules["__main__"]
    spec, path = getattr(main, "__spec__", None), main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


def _child(work: Callable[[dict, Reporter], dict], spec: dict, connection, log_file: str) -> None:
    """The child's side: output to the log, work, one final message."""
    _die_with_parent()
    descriptor = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    handler = logging.FileHandler(log_file, mode="a")
    handler.setFormatter(LOG_FORMAT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with measure() as measured:
            result = work(spec, Reporter(connection))
        connection.send(("done", {**result, "process": {**result.get("process", {}), **measured}}))
    except InputError as exc:
        connection.send(("input", str(exc)))
    except BaseException as exc:
        failure = write_failure(exc)
        if failure is not None:  # described by the parent, as every failed write of a stage
            connection.send(("write", (failure.errno, failure.strerror, failure.filename)))
            return
        log.error("%s failed:\n%s", spec["what"], traceback.format_exc())
        connection.send(("failure", f"{spec['what']} failed: {type(exc).__name__}: {exc}"))
    finally:
        connection.close()
        atexit._run_exitfuncs()  # a forked child ends without them: temporary folders libraries made, among others


def _die_with_parent() -> None:
    """SIGKILL this process when the fork server that started it ends (it ends with the run's process)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child ends at its next message to a parent that is gone
