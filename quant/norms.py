"""How far one weight tensor is from another, as the report states it."""

from __future__ import annotations

import torch


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    """||approximation - exact|| / ||exact|| (Frobenius), computed in fp32."""
    exact = exact.float()
    return ((approximation.float() - exact).norm() / exact.norm().clamp(min=1e-30)).item()
