"""Wall time and peak memory of one step of the pipeline."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@contextmanager
def measure() -> Iterator[dict]:
    """Yield a dict that is filled with seconds, peak_rss_mb (and peak_gpu_mb on CUDA) on exit.

    rss_start_mb is the resident memory when the step began (Linux), so the step's own peak is
    the difference. Where the peak-RSS mark cannot be reset, peak_rss_mb is the process's peak so far.
    """
    record: dict = {}
    _reset_peak_rss()
    start = _proc_status_mb("VmRSS")
    if start is not None:
        record["rss_start_mb"] = round(start, 1)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = round(time.perf_counter() - started, 2)
        record["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        if torch.cuda.is_available():
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def model_memory(model) -> dict[str, float]:
    """What a loaded model holds: its parameters' and buffers' bytes, and this process's resident memory now
    (Linux), in MB."""
    tensors = [*model.parameters(), *model.buffers()]
    held = {"model_mb": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)}
    resident = _proc_status_mb("VmRSS")
    if resident is not None:
        held["rss_after_load_mb"] = round(resident, 1)
    return held
