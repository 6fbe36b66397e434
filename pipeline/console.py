"""What a person sees while a run works: one line per stage, progress, warnings, then the final table.

Everything else (our own detail, and whatever libraries print: gptqmodel writes hundreds of lines
per GPTQ run, datasets and transformers their progress bars and warnings) goes to the run's log.
Library output is caught at the file-descriptor level, so prints from C extensions and
subprocesses are caught too.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# Records of this logger are for people: the console shows them (and the run's log keeps them).
console = logging.getLogger("qlora_requant.console")
OWN_LOGGERS = "qlora_requant"
_FORMAT = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
# run.log's lines: several jobs (and their stage processes) may append to one run's log, so each names its host and pid
LOG_FORMAT = logging.Formatter(f"%(asctime)s {socket.gethostname()}:%(process)d %(levelname)s %(name)s: %(message)s")


class _ForPeople(logging.Filter):
    """Console lines, and warnings or errors of this tool's own modules."""

    def filter(self, record: logging.LogRecord) -> bool:
        own_warning = record.levelno >= logging.WARNING and record.name.startswith(OWN_LOGGERS)
        return record.name == console.name or own_warning


class _ConsoleHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        self.stream = terminal()
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        record = logging.makeLogRecord({**record.__dict__, "msg": prefix + record.getMessage(), "args": ()})
        return _FORMAT.format(record)


_handler = _ConsoleHandler(sys.stderr)
_handler.addFilter(_ForPeople())


# Loggers of libraries whose chatter is held to warnings (the run's log keeps those).
LIBRARY_LOGGERS = ("transformers", "datasets", "accelerate", "peft", "httpx", "urllib3")


@contextmanager
def shown() -> Iterator[None]:
    """Within: console records are shown on the current standard error, every record at INFO reaches the
    handlers (the run's log among them), Python warnings are logged and the libraries' chatter is held to
    warnings. After: the logging set-up is as it was (a program that imports this tool keeps its own)."""
    root = logging.getLogger()
    if _handler in root.handlers:  # within an outer one
        yield
        return
    levels = {name: logging.getLogger(name).level for name in ("", *LIBRARY_LOGGERS)}
    _handler.stream = sys.stderr  # not setStream: it flushes the old stream, which a test may have closed
    root.addHandler(_handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(_handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def terminal() -> TextIO:
    """Where console lines go (the terminal, even while library output goes to the log); standard error
    when that stream has been closed since (as a test's captured stream is)."""
    stream = _handler.stream
    return sys.stderr if getattr(stream, "closed", False) else stream


def log_to(path: Path) -> logging.Handler:
    """Append every log record to `path`; returns the handler, for `stop_logging`."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(LOG_FORMAT)
    logging.getLogger().addHandler(handler)
    return handler


def stop_logging(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


class LibraryOutput:
    """Keeps library output off the console: in a temporary file until `into(log)` names the run's log.

    Used as a context manager; on exit the standard streams are restored (what was caught before
    any `into` is dropped).
    """

    def __init__(self) -> None:
        self._saved: list[int] = []
        self._terminal: TextIO | None = None
        self._previous_stream: TextIO | None = None
        self._pending = tempfile.TemporaryFile()

    def __enter__(self) -> LibraryOutput:
        _flush()
        self._saved = [os.dup(1), os.dup(2)]
        if _on_a_standard_descriptor(_handler.stream):
            self._terminal = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
            self._previous_stream = _handler.setStream(self._terminal)
        self._point_at(self._pending.fileno())
        return self

    def into(self, log: Path) -> None:
        """From now on, library output goes to `log`, after what was caught so far."""
        _flush()
        self._pending.seek(0)
        with log.open("ab") as file:
            shutil.copyfileobj(self._pending, file)
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._point_at(descriptor)
        finally:
            os.close(descriptor)

    def __exit__(self, *exc_info) -> None:
        _flush()
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
            os.close(saved)
        if self._terminal is not None:
            _handler.setStream(self._previous_stream)
            self._terminal.close()
        self._pending.close()

    @staticmethod
    def _point_at(descriptor: int) -> None:
        _flush()
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)


def _flush() -> None:
    for stream_ in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream_ is not None:
            stream_.flush()


def _on_a_standard_descriptor(stream_: TextIO) -> bool:
    """Whether `stream_` writes to descriptor 1 or 2, which library output is about to be pointed away from (a
    notebook's streams are others, and stay as they are)."""
    try:
        return stream_.fileno() in (1, 2)
    except (io.UnsupportedOperation, AttributeError, ValueError):
        return False
