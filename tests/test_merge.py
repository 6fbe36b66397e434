"""Stage 2 against PEFT: our fp32 merge equals `merge_and_unload()` on the same dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import random_adapter, save_model
from pipeline.config import BaseSection
from pipeline.stages.dequantize import run_dequantize
from pipeline.stages.merge import run_merge
from quant.merge import AdapterError

FP32_ROUNDING = 1e-6


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("merge") / "dequantized"
    out.mkdir()
    run_dequantize(BaseSection(path=tiny_base, dtype="bfloat16"), out)
    return out


def peft_merged(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def our_merged(tmp_path, model_dir, adapter_dir, dtype="float32") -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path / "merged"
    out.mkdir()
    summary = run_merge(model_dir, adapter_dir, dtype, out)
    return load_file(out / "model.safetensors"), summary


def assert_matches_peft(tmp_path, model_dir, adapter_dir) -> None:
    ours, summary = our_merged(tmp_path, model_dir, adapter_dir)
    reference = peft_merged(model_dir, adapter_dir)
    original = load_file(next(model_dir.glob("*.safetensors")))
    changed = 0
    for key, tensor in ours.items():
        assert (tensor - reference[key]).abs().max().item() <= FP32_ROUNDING, key
        changed += not torch.equal(tensor, original[key].float())
    assert changed == summary["modules_merged"] > 0


@pytest.mark.parametrize("lora_kwargs", [
    {},
    {"use_rslora": True, "r": 16, "lora_alpha": 8},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 4, "layers.1.mlp.down_proj": 2},
     "alpha_pattern": {"q_proj": 3.0}},
], ids=["lora", "rslora", "rank-alpha-pattern"])
def test_merge_equals_peft_merge_and_unload(tmp_path, dequantized, lora_kwargs):
    adapter = random_adapter(dequantized, tmp_path / "adapter", **lora_kwargs)
    assert_matches_peft(tmp_path, dequantized, adapter)


def test_fan_in_fan_out_on_gpt2(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128)
    model_dir = save_model(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2", dtype=torch.float32)
    adapter = random_adapter(model_dir, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert_matches_peft(tmp_path, model_dir, adapter)


def test_merged_checkpoint_is_plain_transformers(tmp_path, dequantized, tiny_adapter):
    out = tmp_path / "merged"
    out.mkdir()
    run_merge(dequantized, tiny_adapter, "float16", out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and not hasattr(model, "peft_config")


def _edit_adapter(tmp_path, adapter_dir, config_changes=None, rename=None):
    """A copy of an adapter with config keys changed and/or tensor names rewritten."""
    out = tmp_path / "edited"
    out.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file(tensors, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias: 'all'"),
    ({"peft_type": "IA3"}, "adapter type IA3 is not supported"),
])
def test_unsupported_adapter_features_are_refused(tmp_path, dequantized, tiny_adapter, changes, message):
    adapter = _edit_adapter(tmp_path, tiny_adapter, changes)
    with pytest.raises(AdapterError, match=message):
        run_merge(dequantized, adapter, None, tmp_path)


def test_embedding_lora_is_refused(tmp_path, dequantized, tiny_adapter):
    adapter = _edit_adapter(tmp_path, tiny_adapter, rename=lambda k: k.replace("lora_A", "lora_embedding_A"))
    with pytest.raises(AdapterError, match="LoRA on embedding layers"):
        run_merge(dequantized, adapter, None, tmp_path)


def test_adapter_for_another_base_is_refused(tmp_path, dequantized, tokenizer):
    from conftest import tiny_llama

    wider = save_model(tiny_llama(tokenizer, intermediate_size=384), tokenizer, tmp_path / "wider")
    adapter = random_adapter(wider, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"delta for .* has shape .* another base model"):
        run_merge(dequantized, adapter, None, tmp_path / "x")


def test_adapter_targeting_absent_modules_is_refused(tmp_path, dequantized, tiny_adapter):
    adapter = _edit_adapter(tmp_path, tiny_adapter, rename=lambda k: k.replace("q_proj", "query"))
    with pytest.raises(AdapterError, match="targets 2 module.* the base does not have"):
        run_merge(dequantized, adapter, None, tmp_path)


def test_streamed_shards_equal_the_single_file_result(tmp_path, dequantized, tiny_adapter):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir(), sharded.mkdir()
    run_merge(dequantized, tiny_adapter, "float16", whole)
    run_merge(dequantized, tiny_adapter, "float16", sharded, max_shard_bytes=60_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    for name in shards:  # at most the limit (plus the header), unless one tensor alone is larger
        tensors = load_file(sharded / name)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 60_000
    reference = load_file(whole / "model.safetensors")
    streamed = {}
    for name in shards:
        streamed.update(load_file(sharded / name))
    assert streamed.keys() == reference.keys() == index["weight_map"].keys()
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, reference["model.layers.1.mlp.up_proj.weight"])
