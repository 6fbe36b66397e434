"""Shared fixtures: tiny real checkpoints, tokenizers, adapters and texts, built offline (see support.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from qlora_requant.pipeline.demo import split_docstrings, stdlib_corpus, train_tokenizer  # noqa: E402

from support import chat_adapter, random_adapter, save_model, tiny_llama, write_config  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """Standard-library docstrings split into adapter / calibration / eval parts."""
    return split_docstrings(stdlib_corpus()[1])


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus["adapter"], vocab_size=512)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A random tiny LLaMA saved as bf16 safetensors with its tokenizer."""
    return save_model(tiny_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base) -> Path:
    return random_adapter(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")


@pytest.fixture(scope="session")
def text_files(tmp_path_factory, corpus) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    files = {}
    for part in ("calibration", "eval"):
        files[part] = folder / f"{part}.txt"
        files[part].write_text("\n\n".join(corpus[part]) + "\n")
    return files


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_base, tiny_adapter, text_files) -> tuple[Path, Path]:
    """One complete run of the default config on the tiny base, shared: (config, run directory). Tests that change
    it work on a copy (see copy_run)."""
    from qlora_requant.pipeline.cli import EXIT_OK, main

    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder / "run.yaml", tiny_base, tiny_adapter, text_files, folder / "run")
    assert main(["run", str(config)]) == EXIT_OK
    return config, folder / "run"


def chat_records(docstrings: list[str]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You explain Python."},
                {"role": "user", "content": f"What does this do? {doc.split()[0]}"},
                {"role": "assistant", "content": doc},
            ]
        }
        for doc in docstrings
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory, tiny_base, corpus) -> dict[str, Path]:
    """A chat fine-tune of the tiny base (two added tokens, their rows trained) and chat jsonl data."""
    folder = tmp_path_factory.mktemp("chat")
    return {
        "adapter": chat_adapter(tiny_base, folder / "adapter", "trainable_tokens", tied=False),
        "calibration": write_jsonl(folder / "calibration.jsonl", chat_records(corpus["calibration"])),
        "eval": write_jsonl(folder / "eval.jsonl", chat_records(corpus["eval"])),
    }
