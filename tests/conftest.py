"""Shared fixtures: tiny real checkpoints, tokenizers, adapters and texts, all built offline in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from pipeline.demo import split_docstrings, stdlib_corpus, train_tokenizer  # noqa: E402

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """Standard-library docstrings split into adapter / calibration / eval parts."""
    return split_docstrings(stdlib_corpus()[1])


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus["adapter"], vocab_size=512)


def save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype = torch.bfloat16, **save_kwargs) -> Path:
    model.to(dtype).save_pretrained(out_dir, **save_kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config)


def random_adapter(model_dir: Path, out_dir: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    settings.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    peft_model.save_pretrained(out_dir)
    return out_dir


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


def base_section(base: Path, **settings) -> dict:
    """The config's base section for the tiny fixtures (fp32 throughout: fast on CPU)."""
    return {"path": str(base), "dtype": "float32", "bnb": {"compute_dtype": "float32"}, **settings}


def write_config(path: Path, base_dir: Path, adapter_dir: Path, texts: dict[str, Path], output_dir: Path,
                 **sections) -> Path:
    """A valid YAML run config for the tiny fixtures; `sections` replace whole top-level sections."""
    import yaml

    config = {
        "output_dir": str(output_dir),
        "device": "cpu",
        "base": base_section(base_dir),
        "adapter": {"path": str(adapter_dir)},
        "merge": {"dtype": "float16"},
        "requantize": {"bits": 4, "group_size": 64, "batch_size": 4,
                       "calibration": {"path": str(texts["calibration"]), "n_samples": 16, "seq_len": 64}},
        "evaluation": {"text": {"path": str(texts["eval"])}, "seq_len": 64, "max_windows": 24,
                       "prompts": ["The quick", "Return the"], "max_new_tokens": 6},
    }
    config.update(sections)
    path.write_text(yaml.safe_dump(config))
    return path
