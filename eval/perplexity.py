"""Scoring models on fixed token windows: next-token NLL, and KL / top-1 agreement against a reference.

Three window protocols, every model scored on the same windows:
  non-overlapping  consecutive windows of seq_len (the GPTQ paper's protocol); each window's first
                   token is context only, unless a BOS token is prepended
  sliding          windows of seq_len starting every `stride` tokens (the Hugging Face perplexity
                   guide); after the first window only the `stride` new tokens are scored, each with
                   seq_len - stride tokens of context
  conversations    one window per chat record, rendered with the chat template and right-padded; all
                   its tokens are scored, or only the assistant turns' (as SFT trains them)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qlora_requant.quant.chat import ChatSample
from qlora_requant.quant.errors import InputError


@dataclass(frozen=True)
class Windows:
    """Token windows and which of their next-token predictions are scored."""

    input_ids: torch.Tensor  # [windows, seq_len]
    scored: torch.Tensor  # [windows, seq_len - 1] bool: whether the prediction at each position is scored

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def scored_tokens(self) -> torch.Tensor:
        """Tokens scored in each window."""
        return self.scored.sum(dim=1)

    def mask(self, rows: slice) -> torch.Tensor:
        """[rows, seq_len - 1] bool: which predictions of these windows are scored."""
        return self.scored[rows]


def eval_windows(
    stream: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    stride: int | None = None,
    bos_id: int | None = None,
    where: str = "evaluation text",
) -> Windows:
    """Cut a token stream into windows of `seq_len` (non-overlapping, or sliding by `stride`).

    With `bos_id`, every window is BOS followed by seq_len - 1 text tokens, and every text token
    of a fresh window is scored. Text that does not fill a last window is dropped.
    """
    content = seq_len - (bos_id is not None)
    if len(stream) < content:
        raise InputError(
            f"{where}: {len(stream)} tokens, fewer than one window of evaluation.seq_len={seq_len}; "
            "give more text or lower evaluation.seq_len"
        )
    step = content if stride is None else stride
    starts = list(range(0, len(stream) - content + 1, step))[:max_windows]
    rows = torch.stack([stream[start : start + content] for start in starts])
    if bos_id is not None:
        rows = torch.cat([torch.full((len(rows), 1), bos_id, dtype=rows.dtype), rows], dim=1)
    scored = torch.ones(len(rows), seq_len - 1, dtype=torch.bool)
    if stride is not None:
        scored[1:, : seq_len - 1 - stride] = False  # sliding: only the new tokens after the first window
    return Windows(rows, scored)


def conversation_windows(
    samples: list[ChatSample], score: str, pad_id: int, max_windows: int | None = None, where: str = "evaluation data"
) -> Windows:
    """One window per rendered conversation, right-padded with `pad_id` to the longest (a causal model's
    predictions do not see later positions, so padding changes no score). `score`: all its tokens, or only
    the assistant turns' tokens. Conversations with nothing to score are left out."""
    kept = [
        sample for sample in samples if len(sample.input_ids) > 1 and (score == "all" or any(sample.assistant[1:]))
    ][:max_windows]
    if not kept:
        raise InputError(
            f"{where}: no conversation has a token to score (score: {score}); give conversations with assistant "
            "turns inside evaluation.seq_len, or score: all"
        )
    width = max(len(sample.input_ids) for sample in kept)
    rows = torch.full((len(kept), width), pad_id, dtype=torch.long)
    scored = torch.zeros(len(kept), width - 1, dtype=torch.bool)
    for row, sample in enumerate(kept):
        length = len(sample.input_ids)
        rows[row, :length] = torch.tensor(sample.input_ids)
        targets = torch.tensor(sample.assistant[1:]) if score == "assistant" else torch.ones(length - 1)
        scored[row, : length - 1] = targets.bool()
    return Windows(rows, scored)


class ReferenceLogProbs:
    """The reference model's next-token log-probabilities for every window, in a float32 file.

    The file holds windows x (seq_len - 1) x vocab floats (written once, read once per model),
    so that models need not be in memory together.
    """

    def __init__(self, path: Path, windows: Windows):
        self.path, self.windows = path, windows
        self.array: np.ndarray | None = None

    def write(self, rows: slice, log_probs: torch.Tensor) -> None:
        if self.array is None:
            shape = (len(self.windows), self.windows.seq_len - 1, log_probs.shape[-1])
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        self.array[rows] = log_probs.cpu().numpy()

    def read(self, rows: slice, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])).to(device)


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    windows: Windows,
    batch_size: int,
    reference: ReferenceLogProbs | None = None,
    record: bool = False,
) -> dict[str, list[float]]:
    """Per window: summed NLL of the scored tokens and, against `reference`, summed KL(reference ||
    model) and the count of tokens whose top-1 prediction agrees. With `record`, this model's
    log-probabilities are written into `reference` instead (it is the reference)."""
    device = next(model.parameters()).device
    per_window: dict[str, list[float]] = {"nll": [], "kl": [], "top1_agree": []}
    for start in range(0, len(windows), batch_size):
        rows = slice(start, start + batch_size)
        batch = windows.input_ids[rows].to(device)
        log_probs = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)
        mask = windows.mask(rows).to(device)
        nll = -log_probs.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)
        per_window["nll"] += (nll.double() * mask).sum(dim=1).tolist()
        if reference is None:
            continue
        if record:
            reference.write(rows, log_probs)
            continue
        ref = reference.read(rows, device)
        kl = (ref.exp() * (ref - log_probs)).sum(dim=-1)
        agree = ref.argmax(dim=-1) == log_probs.argmax(dim=-1)
        per_window["kl"] += (kl.double() * mask).sum(dim=1).tolist()
        per_window["top1_agree"] += (agree & mask).sum(dim=1).tolist()
    return {key: values for key, values in per_window.items() if values}


def perplexity(nll_per_window: list[float] | torch.Tensor, tokens_per_window: list[int] | torch.Tensor) -> float:
    """exp(total NLL / total scored tokens)."""
    return math.exp(float(sum(nll_per_window)) / float(sum(tokens_per_window)))
