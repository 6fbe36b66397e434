"""Perplexity on fixed token windows (the GPTQ paper's protocol: non-overlapping windows of seq_len)."""

from __future__ import annotations

import math

import torch

from quant.errors import InputError


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None,
                 where: str = "evaluation text") -> torch.Tensor:
    """Cut a token stream into non-overlapping windows of `seq_len`; the remainder is dropped."""
    count = len(stream) // seq_len
    if count == 0:
        raise InputError(f"{where}: {len(stream)} tokens, fewer than one window of evaluation.seq_len={seq_len}; "
                         "give more text or lower evaluation.seq_len")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window (seq_len - 1 tokens scored each), float64."""
    device = next(model.parameters()).device
    sums = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        sums.append(nll.double().sum(dim=1).cpu())
    return torch.cat(sums)


def perplexity(nll_per_window: torch.Tensor, tokens_per_window: int) -> float:
    """exp(mean token NLL) over all windows."""
    return math.exp(nll_per_window.sum().item() / (len(nll_per_window) * tokens_per_window))
