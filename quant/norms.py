"""How far one weight tensor is from another, as the report states it."""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # elements per step: the fp32 temporaries stay ~4 MB, whatever the tensor's size


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    """||approximation - exact|| / ||exact|| (Frobenius), computed in fp32 chunk by chunk."""
    difference_sq = exact_sq = 0.0
    for approx_chunk, exact_chunk in zip(approximation.reshape(-1).split(CHUNK), exact.reshape(-1).split(CHUNK)):
        exact_chunk = exact_chunk.float()
        difference_sq += (approx_chunk.float() - exact_chunk).square().sum().item()
        exact_sq += exact_chunk.square().sum().item()
    return math.sqrt(difference_sq) / max(math.sqrt(exact_sq), 1e-30)
