"""Data for calibration and evaluation, read with `datasets`: plain text, tokenized into one stream and cut
into windows, or chat records, each conversation one sample (see chat.py)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_requant.quant.chat import Conversation, check_conversations, render_conversation
from qlora_requant.quant.errors import InputError

MIN_PASSAGE_WORDS = 8
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Corpus:
    """Calibration or evaluation data: plain texts, or (chat format) conversations."""

    where: str  # the file or dataset, as messages name it
    texts: list[str]  # the texts; for chat data each conversation's messages joined (for the overlap check)
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def chat(self) -> bool:
        return bool(self.conversations)


def load_corpus(
    path: Path | None,
    data_format: str = "text",
    text_field: str = "text",
    messages_field: str = "messages",
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
) -> Corpus:
    """The texts (`data_format` text) or conversations (chat) of a local file or a hub dataset."""
    where = str(path) if path is not None else f"dataset {dataset!r}"
    if data_format == "text":
        return Corpus(where, load_texts(path, text_field, dataset, dataset_config, split))
    table = _read_table(path, dataset, dataset_config, split)
    if messages_field not in table.column_names:
        raise InputError(f"{where}: has no field {messages_field!r} (fields: {table.column_names}); set messages_field")
    conversations = check_conversations(table[messages_field], messages_field, where)
    return Corpus(where, ["\n\n".join(m["content"] for m in c) for c in conversations], conversations)


def load_texts(
    path: Path | None,
    text_field: str = "text",
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
) -> list[str]:
    """Non-empty texts from a local text/jsonl/parquet file or a hub dataset.

    A .txt file yields one text per paragraph (blank-line separated).
    """
    where = str(path) if path is not None else f"dataset {dataset!r}"
    table = _read_table(path, dataset, dataset_config, split)
    if text_field not in table.column_names:
        raise InputError(f"{where}: has no field {text_field!r} (fields: {table.column_names}); set text_field")
    texts = [text for text in table[text_field] if isinstance(text, str) and text.strip()]
    if path is not None and LOCAL_BUILDERS[path.suffix.lower()] == "text":
        texts = [text.rstrip("\n") for text in texts]  # paragraphs keep the newline that ended them
    if not texts:
        raise InputError(f"{where}: holds no text")
    return texts


def _read_table(path: Path | None, dataset: str | None, dataset_config: str | None, split: str):
    """The rows of a local file or a hub dataset, as a datasets table."""
    from datasets import load_dataset

    if path is not None:
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"{path}: unsupported text file type; use one of {sorted(LOCAL_BUILDERS)}")
        if _blank(path):
            raise InputError(f"{path}: holds no text")
        if builder in ("text", "json"):
            _check_text_file(path, jsonl=path.suffix.lower() == ".jsonl")
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            table = load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise InputError(f"{path}: cannot be read as {builder} ({exc})") from None
    else:
        try:
            table = load_dataset(dataset, dataset_config, split=split)
        except Exception as exc:  # hub errors (unknown id, offline, bad split) have many types
            raise InputError(
                f"dataset {dataset!r} (config {dataset_config!r}, split {split!r}) cannot be loaded "
                f"({type(exc).__name__}: {exc}); check the id, or use a local file offline"
            ) from None
    return table


def _check_text_file(path: Path, jsonl: bool) -> None:
    """Refuse, naming the line, a text file that is not UTF-8 or a JSON Lines file with a line that is not JSON
    (datasets' own errors name neither)."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: line {number} is not UTF-8 text (byte {exc.start + 1} of the line: "
                    f"{exc.reason}); re-save the file as UTF-8"
                ) from None
            if jsonl and text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{path}: line {number} is not valid JSON ({exc.msg.removesuffix(' at')}, column {exc.colno}); "
                        "a .jsonl file holds one JSON object per line"
                    ) from None


def _blank(path: Path, probe_bytes: int = 1 << 16) -> bool:
    """Whether a (small) file holds nothing but whitespace; larger files are assumed to hold text."""
    with path.open("rb") as file:
        head = file.read(probe_bytes + 1)
    return len(head) <= probe_bytes and not head.strip()


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized without special tokens and joined by EOS (when the tokenizer has one)."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    return torch.tensor(ids, dtype=torch.long)


def require_tokens(tokenizer, texts: list[str], needed: int, what: str) -> None:
    """Refuse `texts` that tokenize to fewer than `needed` tokens (as `token_stream` joins them);
    tokenizes only as far as needed."""
    separator = 0 if tokenizer.eos_token_id is None else 1
    count = 0
    for text in texts:
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + separator
        if count >= needed:
            return
    raise InputError(f"{what}: {count} tokens, fewer than the {needed} needed; give more text or shorten the windows")


def calibration_windows(
    stream: torch.Tensor, n_samples: int, seq_len: int, seed: int, where: str = "calibration text"
) -> list[dict[str, torch.Tensor]]:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets, as gptqmodel inputs."""
    if len(stream) <= seq_len:
        raise InputError(
            f"{where}: {len(stream)} tokens, fewer than calibration seq_len {seq_len}; "
            "give more text or lower requantize.calibration.seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=generator).tolist()
    return [
        {"input_ids": stream[s : s + seq_len].unsqueeze(0), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
        for s in starts
    ]


def calibration_samples(
    tokenizer, corpus: Corpus, n_samples: int, seq_len: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """gptqmodel inputs: for text, `n_samples` windows of `seq_len` tokens at seeded random offsets of the
    joined stream; for chat, `n_samples` conversations drawn without replacement (all of them, if fewer),
    each rendered with the chat template and cut to `seq_len`, one sample each."""
    if not corpus.chat:
        return calibration_windows(token_stream(tokenizer, corpus.texts), n_samples, seq_len, seed, corpus.where)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(corpus.conversations), generator=generator).tolist()
    samples = []
    for index in order:
        where = f"{corpus.where}: record {index + 1}"
        ids = render_conversation(tokenizer, corpus.conversations[index], seq_len, where=where).input_ids
        if len(ids) > 1:
            samples.append(
                {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            )
        if len(samples) == n_samples:
            break
    if not samples:
        raise InputError(f"{corpus.where}: no conversation renders to more than one token")
    return samples


def _passages(texts: list[str]) -> Iterator[str]:
    """The whitespace-normalized paragraphs of 8+ words in `texts`, in order."""
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            if len(words) >= MIN_PASSAGE_WORDS:
                yield " ".join(words)


def _fingerprint(passage: str) -> str:
    return hashlib.sha1(passage.encode()).hexdigest()


def passage_fingerprints(texts: list[str]) -> set[str]:
    """Hashes of the passages (paragraphs of 8+ words) in `texts`, to detect shared text."""
    return {_fingerprint(passage) for passage in _passages(texts)}


def check_held_out(eval_texts: list[str], calibration_texts: list[str], eval_name: str, refuse: bool = True) -> int:
    """Refuse (or, with refuse=False, count) evaluation text that shares passages (paragraphs of 8+
    words) with the calibration text, quoting the first ones; returns the number of shared passages."""
    calibration = passage_fingerprints(calibration_texts)
    shared = {_fingerprint(p): p for p in _passages(eval_texts) if _fingerprint(p) in calibration}
    if shared and refuse:
        quoted = "; ".join(repr(_shortened(passage)) for passage in list(shared.values())[:2])
        raise InputError(
            f"evaluation.text ({eval_name}) shares {len(shared)} passage(s) with "
            "requantize.calibration; held-out text must not calibrate (give disjoint text, or set "
            f"evaluation.overlap: warn to score it anyway); the first: {quoted}"
        )
    return len(shared)


def _shortened(passage: str, limit: int = 80) -> str:
    return passage if len(passage) <= limit else passage[: limit - 1] + "…"
