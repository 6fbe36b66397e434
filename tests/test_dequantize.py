"""Stage 1 against the libraries: our dequantized weights equal what transformers + bitsandbytes build."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_requant.pipeline.config import BaseSection, BnbSection
from qlora_requant.pipeline.stages.dequantize import DequantizedBase
from qlora_requant.quant.errors import InputError

from support import dequantize_to, library_dequantized, save_4bit, save_model, save_pickled, tiny_llama


def dequantized_tensors(tmp_path, section: BaseSection) -> dict[str, torch.Tensor]:
    out = tmp_path / "dequantized"
    out.mkdir()
    dequantize_to(section, out)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bit_exact_against_transformers_load(tmp_path, tiny_base, quant_type, double_quant, dtype):
    section = BaseSection(path=tiny_base, dtype=dtype, bnb=BnbSection(quant_type=quant_type, double_quant=double_quant))
    ours = dequantized_tensors(tmp_path, section)
    reference = library_dequantized(tiny_base, section, getattr(torch, dtype))
    assert len(reference) == 14  # 7 Linear layers in each of 2 blocks
    for key, expected in reference.items():
        assert ours[key].dtype == expected.dtype
        assert torch.equal(ours[key], expected), key
    original = load_file(tiny_base / "model.safetensors")
    assert torch.equal(ours["lm_head.weight"], original["lm_head.weight"].to(getattr(torch, dtype)))
    assert not torch.equal(
        ours["model.layers.0.mlp.up_proj.weight"],
        original["model.layers.0.mlp.up_proj.weight"].to(getattr(torch, dtype)),
    )


def test_skip_modules_follow_transformers(tmp_path, tiny_base):
    section = BaseSection(path=tiny_base, dtype="bfloat16", bnb=BnbSection(skip_modules=["down_proj"]))
    ours = dequantized_tensors(tmp_path, section)
    reference = library_dequantized(tiny_base, section, torch.bfloat16)
    assert not any("down_proj" in key for key in reference)
    # An explicit skip list replaces transformers' default skips, so lm_head is quantized too.
    assert "lm_head.weight" in reference and len(reference) == 13
    original = load_file(tiny_base / "model.safetensors")
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"])
    for key, expected in reference.items():
        assert torch.equal(ours[key], expected), key


def test_tied_embeddings_and_sharded_checkpoint(tmp_path, tokenizer):
    model_dir = save_model(
        tiny_llama(tokenizer, tie_word_embeddings=True), tokenizer, tmp_path / "tied", max_shard_size="100KB"
    )
    assert (model_dir / "model.safetensors.index.json").is_file()
    section = BaseSection(path=model_dir, dtype="bfloat16")
    out = tmp_path / "out"
    out.mkdir()
    summary = dequantize_to(section, out)
    reference = library_dequantized(model_dir, section, torch.bfloat16)
    ours = {}
    for shard in out.glob("*.safetensors"):
        ours.update(load_file(shard))
    assert summary["quantized"] == len(reference) == 14
    assert "lm_head.weight" not in ours
    for key, expected in reference.items():
        assert torch.equal(ours[key], expected), key
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_gpt2_conv1d_weights_are_transposed_for_quantization(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128)
    model_dir = save_model(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2", dtype=torch.float16)
    section = BaseSection(path=model_dir, dtype="float16")
    ours = dequantized_tensors(tmp_path, section)
    reference = library_dequantized(model_dir, section, torch.float16)
    assert len(reference) == 8
    for key, expected in reference.items():
        assert torch.equal(ours[key].T, expected), key  # Conv1D stores (in, out); Linear4bit holds (out, in)


def test_prequantized_base_gives_the_same_weights(tmp_path, tiny_base):
    section = BaseSection(path=tiny_base, dtype="bfloat16")
    quantized_dir = save_4bit(tiny_base, section, tmp_path / "bnb4bit")
    from_16bit = dequantized_tensors(tmp_path, section)
    (tmp_path / "second").mkdir()
    from_4bit = dequantized_tensors(tmp_path / "second", BaseSection(path=quantized_dir))
    assert from_4bit.keys() == from_16bit.keys()
    for key in from_16bit:
        assert torch.equal(from_4bit[key], from_16bit[key]), key


def test_prequantized_base_refuses_contradicting_settings(tmp_path, tiny_base):
    section = BaseSection(path=tiny_base, dtype="bfloat16")
    quantized_dir = save_4bit(tiny_base, section, tmp_path / "bnb4bit")
    with pytest.raises(InputError, match="base.bnb.quant_type is 'fp4' but .*saved with 'nf4'"):
        dequantized_tensors(tmp_path, BaseSection(path=quantized_dir, bnb=BnbSection(quant_type="fp4")))


def test_pickle_only_checkpoint_is_read_only_when_allowed(tmp_path, tiny_base):
    base = save_pickled(tiny_base, tmp_path / "pickled")
    section = BaseSection(path=base, dtype="bfloat16")
    with pytest.raises(
        InputError,
        match="found pytorch_model.bin: convert it to safetensors, or set allow_pickle: true if you trust it",
    ):
        DequantizedBase(section)
    pickled, safe = (
        DequantizedBase(section, allow_pickle=True),
        DequantizedBase(BaseSection(path=tiny_base, dtype="bfloat16")),
    )
    assert sorted(pickled.keys()) == sorted(safe.keys())
    assert all(torch.equal(pickled.get(key), safe.get(key)) for key in safe.keys())
    (base / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot be read as a weights-only PyTorch pickle"):
        DequantizedBase(section, allow_pickle=True)


def test_truncated_safetensors_is_refused(tmp_path, tiny_base):
    base = tmp_path / "truncated"
    shutil.copytree(tiny_base, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="model.safetensors: .*(cannot be read|truncated)"):
        dequantized_tensors(tmp_path, BaseSection(path=base, dtype="bfloat16"))
