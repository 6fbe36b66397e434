"""Progress of long loops: a bar on a terminal, plain log lines (every 10%) in unattended runs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
Item = TypeVar("Item")


def progress(items: Sequence[Item], what: str, unit: str) -> Iterator[Item]:
    """Yield `items`, reporting how far the loop has come."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=what, unit=unit)
        return
    step = max(1, len(items) // 10)
    for done, item in enumerate(items, 1):
        yield item
        if done % step == 0 or done == len(items):
            log.info("%s: %d/%d %s (%d%%)", what, done, len(items), unit, 100 * done // len(items))
