"""Stage 2 against PEFT: our fp32 merge equals `merge_and_unload()` on the same dequantized weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_requant.pipeline.checkpoint import CheckpointReader, checkpoint_dtype, dtype_of, read_model_config
from qlora_requant.pipeline.config import AdapterSection, BaseSection
from qlora_requant.pipeline.stages.merge import load_adapter, merge_checkpoint
from qlora_requant.quant.merge import AdapterError, read_lora_adapter

from support import FP32_ROUNDING, dequantize_to, peft_merged, random_adapter, save_model, tiny_llama


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory, tokenizer):
    """A dequantized tiny LLaMA whose attention and MLP Linears have biases."""
    folder = tmp_path_factory.mktemp("merge")
    base = save_model(tiny_llama(tokenizer, attention_bias=True, mlp_bias=True), tokenizer, folder / "base")
    out = folder / "dequantized"
    out.mkdir()
    dequantize_to(BaseSection(path=base, dtype="bfloat16"), out)
    return out


def merge_dir(model_dir, section: AdapterSection, dtype: str | None, out, **kwargs) -> dict:
    """merge_checkpoint streaming from the checkpoint in `model_dir`; dtype None keeps the checkpoint's."""
    model_config = read_model_config(model_dir)
    dtype = dtype_of(dtype) if dtype else checkpoint_dtype(model_config, model_dir / "config.json")
    reader = CheckpointReader(model_dir)
    return merge_checkpoint(reader, model_config, load_adapter(section, reader, model_config), dtype, out, **kwargs)


def as_if_trained(adapter_dir, seed: int = 1) -> None:
    """Perturb every saved tensor of an adapter (DoRA magnitudes, biases, saved modules), as training would."""
    generator = torch.Generator().manual_seed(seed)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * (1 + 0.2 * torch.randn(v.shape, generator=generator)) for k, v in tensors.items()}, path)


def our_merged(tmp_path, model_dir, section: AdapterSection, dtype="float32") -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path / "merged"
    out.mkdir()
    summary = merge_dir(model_dir, section, dtype, out)
    return load_file(out / "model.safetensors"), summary


def lora_modules(adapter_dirs) -> set[str]:
    """The base modules that the saved adapter(s) hold LoRA factors for, named as in the base checkpoint."""
    names = set()
    for adapter_dir in adapter_dirs if isinstance(adapter_dirs, list) else [adapter_dirs]:
        for key in load_file(adapter_dir / "adapter_model.safetensors"):
            if ".lora_A." in key or ".lora_embedding_A" in key:
                names.add(key.removeprefix("base_model.model.").split(".lora_")[0])
    return names


def assert_matches_peft(tmp_path, model_dir, adapter_dir, weights=None, combination=None) -> dict:
    if combination is None:
        section = AdapterSection(path=adapter_dir)
    else:
        section = AdapterSection(
            combination=combination, adapters=[{"path": p, "weight": w} for p, w in zip(adapter_dir, weights)]
        )
    ours, summary = our_merged(tmp_path, model_dir, section)
    reference = peft_merged(model_dir, adapter_dir, weights, combination)
    original = load_file(next(model_dir.glob("*.safetensors")))
    # Every tensor of the base and no other (PEFT's state dict adds GPT-2's lm_head, tied to wte and not saved).
    assert ours.keys() == original.keys() and ours.keys() <= reference.keys()
    for key, tensor in ours.items():
        assert (tensor - reference[key]).abs().max().item() <= FP32_ROUNDING, key
    adapted = lora_modules(adapter_dir)
    assert summary["modules_merged"] == len(adapted) > 0
    unchanged = [m for m in adapted if torch.equal(ours[f"{m}.weight"], original[f"{m}.weight"].float())]
    assert not unchanged  # each adapted weight really moved (PEFT's result too, since ours equals it)
    return summary


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {},
        {"use_rslora": True, "r": 16, "lora_alpha": 8},
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 4, "layers.1.mlp.down_proj": 2},
            "alpha_pattern": {"q_proj": 3.0},
        },
        {"target_modules": r".*layers\.1\.(mlp\.up_proj|self_attn\.k_proj)"},
        {"use_dora": True},
        {"bias": "lora_only"},
        {"bias": "all"},
        {"lora_bias": True},
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
        {"target_modules": ["embed_tokens", "q_proj", "down_proj"]},
    ],
    ids=[
        "lora",
        "rslora",
        "rank-alpha-pattern",
        "regex-targets",
        "dora",
        "bias-lora-only",
        "bias-all",
        "lora-bias",
        "modules-to-save",
        "embedding-lora",
    ],
)
def test_merge_equals_peft_merge_and_unload(tmp_path, dequantized, lora_kwargs):
    adapter = random_adapter(dequantized, tmp_path / "adapter", **lora_kwargs)
    as_if_trained(adapter)
    assert_matches_peft(tmp_path, dequantized, adapter)


@pytest.mark.parametrize(
    "combination, ranks, weights",
    [
        ("cat", (8, 4), [0.7, 0.5]),
        ("linear", (8, 8), [0.7, -0.4]),
    ],
)
def test_weighted_adapters_equal_peft_add_weighted_adapter(tmp_path, dequantized, combination, ranks, weights):
    adapters = [
        random_adapter(
            dequantized,
            tmp_path / f"adapter{i}",
            seed=i,
            r=r,
            target_modules=["q_proj", "v_proj", "up_proj"] if i else ["q_proj", "down_proj"],
        )
        for i, r in enumerate(ranks)
    ]
    summary = assert_matches_peft(tmp_path, dequantized, adapters, weights, combination)
    assert summary["modules_merged"] == 2 * 4  # q, v, up, down in each of 2 layers


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
    merge_dir(dequantized, AdapterSection(path=tiny_adapter), "float16", out)
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


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "IA3"}, "adapter type IA3 is not supported"),
        ({"peft_type": "LOHA"}, "adapter type LOHA is not supported"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is not supported"),
    ],
)
def test_unsupported_adapter_features_are_refused(tmp_path, dequantized, tiny_adapter, changes, message):
    adapter = _edit_adapter(tmp_path, tiny_adapter, changes)
    with pytest.raises(AdapterError, match=message):
        merge_dir(dequantized, AdapterSection(path=adapter), None, tmp_path)


def test_dora_on_embeddings_is_refused(tmp_path, dequantized):
    adapter = random_adapter(dequantized, tmp_path / "embedding", target_modules=["embed_tokens", "q_proj"])
    adapter = _edit_adapter(tmp_path, adapter, {"use_dora": True})
    with pytest.raises(AdapterError, match="DoRA on embedding layers is not supported"):
        merge_dir(dequantized, AdapterSection(path=adapter), None, tmp_path)


def test_linear_combination_of_different_ranks_is_refused(tmp_path, dequantized):
    adapters = [random_adapter(dequantized, tmp_path / f"a{r}", r=r) for r in (4, 8)]
    section = AdapterSection(combination="linear", adapters=[{"path": p} for p in adapters])
    with pytest.raises(AdapterError, match=r"'linear' needs adapters of one rank, got r=\[4, 8\]; use 'cat'"):
        merge_dir(dequantized, section, None, tmp_path)


def test_adapter_for_another_base_is_refused(tmp_path, dequantized, tokenizer):
    from support import tiny_llama

    wider = save_model(tiny_llama(tokenizer, intermediate_size=384), tokenizer, tmp_path / "wider")
    adapter = random_adapter(wider, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"delta for .* has shape .* another base model"):
        merge_dir(dequantized, AdapterSection(path=adapter), None, tmp_path / "x")


def test_lora_weights_of_modules_peft_does_not_target_are_ignored_with_a_warning(
    tmp_path, dequantized, tiny_adapter, caplog
):
    adapter = _edit_adapter(tmp_path, tiny_adapter, rename=lambda k: k.replace("q_proj", "query"))
    out = tmp_path / "out"
    out.mkdir()
    assert merge_dir(dequantized, AdapterSection(path=adapter), None, out)["modules_merged"] == 12
    assert (
        f"{adapter}: ignoring LoRA weights of 2 module(s) outside its target_modules, as PEFT does: "
        "model.layers.0.self_attn.query, model.layers.1.self_attn.query"
    ) in caplog.text


def test_merge_follows_target_modules_as_peft_does(tmp_path, dequantized, tiny_adapter):
    """An adapter file with weights for every Linear but target_modules [q_proj, k_proj]: PEFT loads four."""
    adapter = _edit_adapter(tmp_path, tiny_adapter, config_changes={"target_modules": ["q_proj", "k_proj"]})
    ours, summary = our_merged(tmp_path, dequantized, AdapterSection(path=adapter))
    assert summary["modules_merged"] == 4
    peft = peft_merged(dequantized, adapter)
    for key, tensor in ours.items():
        assert (tensor - peft[key]).abs().max().item() <= FP32_ROUNDING, key


def test_an_adapter_whose_targets_match_no_module_is_refused(tmp_path, dequantized, tiny_adapter):
    adapter = _edit_adapter(tmp_path, tiny_adapter, config_changes={"target_modules": ["qq_proj"]})
    with pytest.raises(
        AdapterError,
        match=r"Target modules \{'qq_proj'\} not found in the base model.* "
        r"\(target_modules / target_parameters in adapter_config.json\); was the adapter trained on another base model",
    ):
        merge_dir(dequantized, AdapterSection(path=adapter), None, tmp_path)


def test_streamed_shards_equal_the_single_file_result(tmp_path, dequantized, tiny_adapter):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir(), sharded.mkdir()
    merge_dir(dequantized, AdapterSection(path=tiny_adapter), "float16", whole)
    merge_dir(dequantized, AdapterSection(path=tiny_adapter), "float16", sharded, max_shard_bytes=60_000)
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


def test_pickled_adapter_is_read_only_when_allowed(tmp_path, tiny_adapter):
    adapter = tmp_path / "pickled-adapter"
    shutil.copytree(tiny_adapter, adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="found adapter_model.bin: save it as safetensors, or set allow_pickle"):
        read_lora_adapter(adapter)
    pickled, safe = read_lora_adapter(adapter, allow_pickle=True), read_lora_adapter(tiny_adapter)
    assert pickled.modules.keys() == safe.modules.keys() and len(safe.modules) == 14
    for key, module in safe.modules.items():
        assert torch.equal(pickled.modules[key].lora_a, module.lora_a), key
        assert torch.equal(pickled.modules[key].lora_b, module.lora_b), key
        assert pickled.modules[key].scaling == module.scaling == 2.0, key  # lora_alpha 16 / r 8
