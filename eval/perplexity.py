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

import json
import math
from collections.abc import Callable
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

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"input_ids": self.input_ids.contiguous(), "scored": self.scored.contiguous()}, path)

    @classmethod
    def load(cls, path: Path) -> Windows:
        from safetensors.torch import load_file

        tensors = load_file(path)
        return cls(tensors["input_ids"], tensors["scored"])


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


# Log-probabilities are computed for at most this many bytes of positions x vocabulary at once, so that memory
# per batch does not grow with batch x seq_len x vocab (32 MB: 65 positions of a 128k vocabulary).
CHUNK_BYTES = 1 << 25


@dataclass(frozen=True)
class OutputLayer:
    """What turns a model's final hidden states into its next-token logits: its output head (with any adapter on
    it) and what the architecture applies after it (Cohere's logit scale, Granite's logits scaling, Gemma 2's
    final soft-capping), in the order the models' forward passes apply them."""

    head: torch.nn.Module
    config: object

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if getattr(self.config, "logit_scale", None):
            logits = logits * self.config.logit_scale
        if getattr(self.config, "logits_scaling", None):
            logits = logits / self.config.logits_scaling
        if getattr(self.config, "final_logit_softcapping", None):
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(hidden).float(), dim=-1)

    def vocabulary(self) -> int:
        return int(getattr(self.config, "vocab_size", 0) or 1)


def model_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, OutputLayer]:
    """A causal LM's decoder (everything up to the final hidden states) and its output layer; for a PEFT model,
    those of the model with its adapters in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), OutputLayer(base.get_output_embeddings(), base.config)


class FullReference:
    """The reference model's full next-token log-probabilities at every scored token, float32 on disk:
    tokens x vocab x 4 bytes (513 KB per token at a vocabulary of 128k). For comparison with HiddenReference."""

    def __init__(self, path: Path, tokens: int):
        self.path, self.tokens = path, tokens
        self.array: np.ndarray | None = None

    def write(self, start: int, hidden: torch.Tensor, log_probs: torch.Tensor) -> None:
        if self.array is None:
            shape = (self.tokens, log_probs.shape[-1])
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        self.array[start : start + len(log_probs)] = log_probs.cpu().numpy()

    def keep_output_layer(self, output: OutputLayer) -> None:
        """Nothing to keep: the log-probabilities are stored."""

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[start:stop])).to(device)


class HiddenReference:
    """The reference model at every scored token, compact and exact: the final hidden states its output layer
    reads, float32 on disk (tokens x hidden x 4 bytes: 16 KB per token at hidden 4096), and that output layer as
    one matrix, which recomputes its log-probabilities chunk by chunk while another model is scored.

    Recorded into a folder by the reference stage (`write`, then `save_output_layer`), read by every scoring
    stage (`HiddenReference.open`): HIDDEN, OUTPUT_LAYER and OUTPUT_CONFIG in that folder.
    """

    HIDDEN, OUTPUT_LAYER, OUTPUT_CONFIG = "hidden.npy", "output_layer.safetensors", "output_layer.json"

    def __init__(self, path: Path, tokens: int):
        self.path, self.tokens = path, tokens
        self.array: np.ndarray | None = None
        self.output: OutputLayer | None = None
        self.dtype = torch.float32  # the hidden states' own dtype, restored before the output layer reads them

    def write(self, start: int, hidden: torch.Tensor, log_probs: torch.Tensor) -> None:
        if self.array is None:
            self.dtype = hidden.dtype
            shape = (self.tokens, hidden.shape[-1])
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        self.array[start : start + len(hidden)] = hidden.float().cpu().numpy()

    def keep_output_layer(self, output: OutputLayer) -> None:
        """Keep the reference's output layer as one Linear layer (a PEFT layer in it would be switched off by a later
        `disable_adapter()` on that model, and is not needed to read it back)."""
        self.output = OutputLayer(plain_linear(*dense_layer(output.head)), output.config)

    def save_output_layer(self, folder: Path) -> None:
        """The kept output layer and what follows it, beside the hidden states."""
        from safetensors.torch import save_file

        head = self.output.head
        tensors = {"weight": head.weight, **({"bias": head.bias} if head.bias is not None else {})}
        save_file(
            {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, folder / self.OUTPUT_LAYER
        )
        config = {key: getattr(self.output.config, key, None) for key in LOGIT_TRANSFORMS}
        (folder / self.OUTPUT_CONFIG).write_text(
            json.dumps({**config, "hidden_dtype": str(self.dtype).removeprefix("torch.")}, indent=1) + "\n"
        )

    @classmethod
    def open(cls, folder: Path, device: torch.device | str) -> HiddenReference:
        """A recorded reference, read from `folder` (the hidden states memory-mapped), its output layer on
        `device`."""
        from types import SimpleNamespace

        from safetensors.torch import load_file

        config = json.loads((folder / cls.OUTPUT_CONFIG).read_text())
        dtype = getattr(torch, config.pop("hidden_dtype"))
        tensors = load_file(folder / cls.OUTPUT_LAYER, device=str(device))
        reference = cls(folder / cls.HIDDEN, 0)
        reference.array = np.load(folder / cls.HIDDEN, mmap_mode="r")
        reference.tokens, reference.dtype = len(reference.array), dtype
        reference.output = OutputLayer(plain_linear(tensors["weight"], tensors.get("bias")), SimpleNamespace(**config))
        return reference

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        head_device = next(self.output.head.parameters()).device
        hidden = torch.from_numpy(np.ascontiguousarray(self.array[start:stop])).to(head_device, self.dtype)
        return self.output.log_probs(hidden).to(device)


# What an architecture applies to its output head's logits (see OutputLayer.logits), and the vocabulary size.
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping", "vocab_size")
IDENTITY_ROWS = 1024  # rows of the identity passed through an output head at once (see dense_weight)


@torch.no_grad()
def dense_layer(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight W and bias b with head(x) == x @ W.T + b, in the head's dtype and on its device.

    A plain Linear head gives its own tensors. A PEFT module that holds one matrix (modules_to_save, trainable token
    rows) gives it bit for bit: each row is read back by passing rows of the identity through the head, one product
    with 1 and additions of exact zeros. A head with LoRA or DoRA on it gives its effective matrix, equal to its own
    output within rounding.
    """
    if type(head) is torch.nn.Linear:
        return head.weight.detach(), None if head.bias is None else head.bias.detach()
    parameter = next(head.parameters())
    width = next(m.in_features for m in head.modules() if isinstance(m, torch.nn.Linear))
    bias = head(torch.zeros(1, width, dtype=parameter.dtype, device=parameter.device))[0]
    columns = []
    for first in range(0, width, IDENTITY_ROWS):
        count = min(IDENTITY_ROWS, width - first)
        rows = torch.zeros(count, width, dtype=parameter.dtype, device=parameter.device)
        rows[torch.arange(count), torch.arange(first, first + count)] = 1
        columns.append(head(rows))
    if not bias.any():
        return torch.cat(columns).T.contiguous(), None
    return (torch.cat(columns) - bias).T.contiguous(), bias


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A Linear layer holding exactly these tensors."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


Reference = FullReference | HiddenReference


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    windows: Windows,
    batch_size: int,
    reference: Reference | None = None,
    record: bool = False,
    on_windows: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Per window: summed NLL of the scored tokens and, against `reference`, summed KL(reference ||
    model) and the count of tokens whose top-1 prediction agrees. With `record`, this model is written into
    `reference` instead (it is the reference). `on_windows(done)` is called after each batch.

    The model's decoder runs once per batch; its output layer runs only at scored positions, in chunks of
    CHUNK_BYTES of log-probabilities. The first batch checks that this reproduces the model's own logits.
    """
    decoder, output = model_parts(model)
    device = input_device(model)
    per_window: dict[str, list[float]] = {"nll": [], "kl": [], "top1_agree": []}
    chunk = max(1, CHUNK_BYTES // (4 * output.vocabulary()))
    token = 0  # index of the batch's first scored token among all windows' scored tokens
    for start in range(0, len(windows), batch_size):
        rows = slice(start, start + batch_size)
        batch = windows.input_ids[rows].to(device)
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
        if start == 0:
            _check_output_layer(model, output, batch, hidden)
        mask = windows.mask(rows).to(hidden.device)
        scored_hidden, targets = hidden[:, :-1][mask], batch[:, 1:].to(hidden.device)[mask]
        owner = torch.arange(len(batch), device=hidden.device).repeat_interleave(mask.sum(dim=1))
        sums = {key: torch.zeros(len(batch), dtype=torch.float64, device=hidden.device) for key in per_window}
        for first in range(0, len(targets), chunk):
            part = slice(first, first + chunk)
            log_probs = output.log_probs(scored_hidden[part])
            nll = -log_probs.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1)
            sums["nll"].index_add_(0, owner[part], nll.double())
            if reference is None:
                continue
            if record:
                reference.write(token + first, scored_hidden[part], log_probs)
                continue
            ref = reference.read(token + first, token + first + len(nll), log_probs.device)
            kl = (ref.exp() * (ref - log_probs)).sum(dim=-1)
            sums["kl"].index_add_(0, owner[part], kl.double())
            sums["top1_agree"].index_add_(0, owner[part], (ref.argmax(-1) == log_probs.argmax(-1)).double())
        token += len(targets)
        per_window["nll"] += sums["nll"].tolist()
        if reference is not None and not record:
            per_window["kl"] += sums["kl"].tolist()
            per_window["top1_agree"] += [int(count) for count in sums["top1_agree"].tolist()]
        if on_windows is not None:
            on_windows(min(start + batch_size, len(windows)))
    if record and reference is not None:
        reference.keep_output_layer(output)
    return {key: values for key, values in per_window.items() if values}


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device, or (placed by accelerate over several devices)
    the first placed module's."""
    placement = getattr(model, "hf_device_map", None) or getattr(
        getattr(model, "base_model", None), "hf_device_map", None
    )
    if placement:
        first = next(iter(placement.values()))
        return torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)
    return next(model.parameters()).device


def _check_output_layer(model, output: OutputLayer, batch: torch.Tensor, hidden: torch.Tensor) -> None:
    """The model's own logits at the last position of the first window equal its output layer's on the decoder's
    hidden states; otherwise the architecture applies something after its head that OutputLayer does not."""
    own = model(input_ids=batch[:1], logits_to_keep=1, use_cache=False).logits[0, -1].float()
    ours = output.logits(hidden[:1, -1])[0].float().to(own.device)
    error = ((ours - own).abs().max() / own.abs().max().clamp(min=1e-6)).item()
    if error > 1e-4:
        raise RuntimeError(
            f"{type(model).__name__}: its output layer, recomputed from the final hidden states, is off from the "
            f"model's logits by {error:.2g} (relative); this architecture transforms its logits in a way the "
            "evaluation does not know: report it"
        )


def perplexity(nll_per_window: list[float] | torch.Tensor, tokens_per_window: list[int] | torch.Tensor) -> float:
    """exp(total NLL / total scored tokens)."""
    return math.exp(float(sum(nll_per_window)) / float(sum(tokens_per_window)))
