"""Progress of long loops, on the console: a bar on a terminal, a line every 10% in unattended runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from qlora_requant.pipeline.console import console, terminal

Item = TypeVar("Item")


def progress(items: Sequence[Item], what: str, unit: str) -> Iterator[Item]:
    """Yield `items`, reporting how far the loop has come."""
    stream = terminal()
    if stream.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=what, unit=unit, file=stream)
        return
    step = max(1, len(items) // 10)
    for done, item in enumerate(items, 1):
        yield item
        if done % step == 0 or done == len(items):
            console.info("%s: %d/%d %s (%d%%)", what, done, len(items), unit, 100 * done // len(items))
