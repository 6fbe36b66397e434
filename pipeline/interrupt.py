"""SIGTERM (a scheduler's, Kubernetes', `kill`) and SIGINT (Ctrl-C) end a run the way an error does.

The signal becomes an `Interrupted` exception in the main thread, so every cleanup on the way out runs:
the stage's temporary folder is removed, the stage's own process (GPTQ, its check, a model's scoring) is
killed, the job's locks are released. Completed stages keep their records, so the
same command resumes the run. Further signals are ignored while that cleanup runs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The run was asked to stop by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        self.activity = "the input checks"  # what the run was doing, as `qlora_requant.run` found it

    def __str__(self) -> str:
        return (
            f"interrupted by {self.signal_name} during {self.activity}; nothing half-written is kept and completed "
            "stages stand: run the same command again to resume"
        )


def _raise(signum: int, frame: FrameType | None) -> None:
    for handled in HANDLED:
        signal.signal(handled, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise `Interrupted`. After: their previous handling is back. Signals are
    only the main thread's to handle, so in another thread this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {handled: signal.getsignal(handled) for handled in HANDLED}
    for handled in HANDLED:
        signal.signal(handled, _raise)
    try:
        yield
    finally:
        for handled, handler in previous.items():
            signal.signal(handled, signal.SIG_DFL if handler is None else handler)
