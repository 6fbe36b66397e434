"""Dequantize and merge across architectures, sharded checkpoints and tied embeddings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qlora_requant.pipeline.config import AdapterSection, BaseSection
from qlora_requant.pipeline.stages.dequantize import DequantizedBase
from qlora_requant.pipeline.stages.merge import load_adapter, merge_checkpoint

from support import FP32_ROUNDING, dequantize_to, library_dequantized, peft_merged, random_adapter, save_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# Config class, model class, extra config, and the Linear layers per block that bitsandbytes quantizes (the
# output head stays 16-bit).
ARCHITECTURES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2), 7),  # q k v o gate up down
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True), 7),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, 4),  # query_key_value dense dense_h_to_4h dense_4h_to_h
    "phi": ("PhiConfig", "PhiForCausalLM", {}, 6),  # q k v dense fc1 fc2
}


def read_all(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dequantize_and_merge_match_the_libraries(tmp_path, tokenizer, architecture):
    import transformers

    config_class, model_class, extra, linears_per_block = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **SMALL, **extra)
    base = save_model(getattr(transformers, model_class)(config), tokenizer, tmp_path / "base", max_shard_size="60KB")
    assert len(list(base.glob("*.safetensors"))) > 1

    section = BaseSection(path=base, dtype="bfloat16")
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    dequantize_to(section, dequantized, max_shard_size=100_000)
    ours = read_all(dequantized)
    reference = library_dequantized(base, section, torch.bfloat16)
    assert len(reference) == 2 * linears_per_block
    for key, expected in reference.items():
        assert torch.equal(ours[key], expected), key

    adapter = random_adapter(dequantized, tmp_path / "adapter")
    merged = tmp_path / "merged"
    merged.mkdir()
    streamed = DequantizedBase(section)  # the merge stage dequantizes on the fly, never reading `dequantized`
    lora = load_adapter(AdapterSection(path=adapter), streamed, streamed.model_config)
    summary = merge_checkpoint(streamed, streamed.model_config, lora, torch.float32, merged, max_shard_bytes=100_000)
    assert summary["modules_merged"] == len(reference)
    peft = peft_merged(dequantized, adapter)
    merged_tensors = read_all(merged)
    assert merged_tensors.keys() == ours.keys()  # every tensor of the base, and no other
    for key, tensor in merged_tensors.items():
        if key in peft:
            assert (tensor - peft[key]).abs().max().item() <= FP32_ROUNDING, key
        else:  # saved under a legacy name (GPT-NeoX's embed_out is lm_head in the model): never merged
            assert key not in reference and torch.equal(tensor, ours[key].float()), key
