"""SIGTERM (a scheduler's, Kubernetes', `kill`) and SIGINT (Ctrl-C) end a run the way an error does.

The signal becomes an `Interrupted` exception in the main thread, so every cleanup on the way out runs:
the stage's temporary folder is removed, the stage's own process (GPTQ, its check, a model's scoring) is
killed, the job's locks are released. Completed stages keep their records, so the
same command resumes the run. Further signals are ignored while that cleanup runs.
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The run was asked to stop by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def _raise(signum: int, frame: FrameType | None) -> None:
    for handled in HANDLED:
        signal.signal(handled, signal.SIG_IGN)
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGINT into `Interrupted` (call from the main thread)."""
    for handled in HANDLED:
        signal.signal(handled, _raise)


def restore_signals() -> None:
    """Give SIGTERM and SIGINT their default handling back (SIGINT: KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
