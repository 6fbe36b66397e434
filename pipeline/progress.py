"""Progress of long work, on the console: a live bar on a terminal; in unattended runs (a Slurm log, a
file), a plain line at most every LINE_SECONDS, with the rate and the time left."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from qlora_requant.pipeline.console import console, terminal

Item = TypeVar("Item")
LINE_SECONDS = 30.0  # in unattended output, at most one progress line this often (and one at the end)


class Progress:
    """How far one piece of work has come: `update(done)` as it goes, `close()` at the end."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.started = self._last_line = time.monotonic()
        self.done = 0
        stream = terminal()
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, file=stream)

    def update(self, done: int, total: int | None = None) -> None:
        """`done` of the total (which `total` corrects, when the work learns it on the way)."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if self._bar is None and (now - self._last_line >= LINE_SECONDS or done >= self.total):
            self._last_line = now
            console.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """'what: done/total unit (pct%), rate unit/s, about N s left'."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done // max(self.total, 1)}%)"
        if 0 < self.done < self.total:
            text += f", {rate:.3g} {self.unit}/s, about {(self.total - self.done) / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(items: Sequence[Item], what: str, unit: str) -> Iterator[Item]:
    """Yield `items`, reporting how far the loop has come."""
    shown = Progress(what, len(items), unit)
    try:
        for done, item in enumerate(items, 1):
            yield item
            shown.update(done)
    finally:
        shown.close()
