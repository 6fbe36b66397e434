"""Every architecture the README lists: dequantize and merge against the libraries, and whole runs (merge,
GPTQ, evaluation) from a 16-bit base and from a base saved in bitsandbytes 4-bit form."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_requant.pipeline.checkpoint import CheckpointReader
from qlora_requant.pipeline.cli import EXIT_OK, main
from qlora_requant.pipeline.config import AdapterSection, BaseSection
from qlora_requant.pipeline.stages.dequantize import DequantizedBase
from qlora_requant.pipeline.stages.merge import load_adapter, merge_checkpoint

from support import (
    FP32_ROUNDING,
    base_section,
    dequantize_to,
    library_dequantized,
    peft_merged,
    random_adapter,
    save_model,
    write_config,
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# Config class, model class, extra config, and the Linear layers per block that bitsandbytes quantizes (the
# output head stays 16-bit).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2), 7),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2), 7),  # q k v o gate up down
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True), 7),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, 4),  # query_key_value dense dense_h_to_4h dense_4h_to_h
    "phi": ("PhiConfig", "PhiForCausalLM", {}, 6),  # q k v dense fc1 fc2
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2), 4),  # qkv_proj o gate_up_proj down
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16), 7),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16), 7),
    # q k v o; the experts are 3-D parameters and the router is no Linear: neither is quantized
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4), 4),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
        4,
    ),
}


# LoRA on raw parameters per mixture-of-experts block, as PEFT's all-linear gives it: the experts' fused
# gate_up_proj and down_proj, and the router's weight
EXPERT_PARAMETERS = {"mixtral": 3, "qwen3-moe": 3}


# Whole runs from a base saved in bitsandbytes 4-bit form, for the architectures whose 4-bit save differs from
# LLaMA's: a tied head, fused layers, legacy tensor names, experts bitsandbytes leaves unquantized. Every
# architecture runs whole from a 16-bit base.
FOUR_BIT_SAVES = ("llama", "qwen2-tied", "gpt-neox", "phi3", "mixtral")


def whole_runs(architectures) -> list[tuple[str, str]]:
    """(architecture, form) of the whole-run tests."""
    return [
        (name, form)
        for name in architectures
        for form in ("16-bit", "bnb-4bit")
        if form == "16-bit" or name in FOUR_BIT_SAVES
    ]


def tiny_model(tokenizer, architecture: str, seed: int = 0):
    import transformers

    config_class, model_class, extra, _ = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SMALL,
        **extra,
    )
    return getattr(transformers, model_class)(config)


def read_all(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dequantize_and_merge_match_the_libraries(tmp_path, tokenizer, architecture):
    from transformers import AutoModelForCausalLM

    linears_per_block = ARCHITECTURES[architecture][3]
    base = save_model(tiny_model(tokenizer, architecture), tokenizer, tmp_path / "base", max_shard_size="60KB")
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
    assert summary["parameters_merged"] == 2 * EXPERT_PARAMETERS.get(architecture, 0)
    assert read_all(merged).keys() == ours.keys()  # every tensor of the base under its name, and no other
    # as transformers loads it (experts stacked into 3-D parameters, legacy names renamed), equal to PEFT's merge
    loaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    peft = peft_merged(dequantized, adapter)
    assert loaded.keys() == peft.keys()
    for key, tensor in loaded.items():
        assert (tensor - peft[key]).abs().max().item() <= FP32_ROUNDING, key


def whole_run_config(tmp_path, tokenizer, text_files, architecture: str, form: str):
    """A run of a random adapter on a tiny base of `architecture`, saved in 16-bit or bitsandbytes 4-bit form."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = save_model(tiny_model(tokenizer, architecture), tokenizer, tmp_path / "base", dtype=torch.float32)
    adapter = random_adapter(base, tmp_path / "adapter", r=4, lora_alpha=4)
    if form == "bnb-4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        four_bit = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantization, dtype=torch.float32, device_map="cpu"
        )
        base = save_model(four_bit, tokenizer, tmp_path / "base-4bit", dtype=None)
    return write_config(
        tmp_path / "run.yaml",
        base,
        adapter,
        text_files,
        tmp_path / "run",
        # a 4-bit save carries its own bitsandbytes settings
        base=base_section(base) if form == "16-bit" else {"path": str(base)},
        requantize={
            "bits": 4,
            "group_size": 64,
            "batch_size": 4,
            "calibration": {"path": str(text_files["calibration"]), "n_samples": 8, "seq_len": 32},
        },
        evaluation={"text": {"path": str(text_files["eval"])}, "seq_len": 32, "max_windows": 6},
    )


@pytest.mark.parametrize(
    "architecture, form", whole_runs(name for name in ARCHITECTURES if name not in EXPERT_PARAMETERS)
)
def test_a_whole_run_from_each_architecture(tmp_path, tokenizer, text_files, architecture, form):
    """Merge, GPTQ and the evaluation run to the end; the merged model is the separate adapter's, and the
    GPTQ checkpoint loads in plain transformers (the requantize stage checks it in a fresh process)."""
    config = whole_run_config(tmp_path, tokenizer, text_files, architecture, form)
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    merged, gptq = report["models"]["merged"], report["models"]["gptq"]
    assert abs(merged["delta_pct"]) < 0.5 and merged["kl"] < 1e-3, merged
    assert gptq["kl"] > merged["kl"] and report["requantize"]["check_relative_error"] < 0.5
    assert report["stages"]["merge"]["modules_merged"] == 2 * ARCHITECTURES[architecture][3]
    fused = 2 * 4 if architecture == "phi3" else 0  # qweight, qzeros, scales, g_idx of each gate_up_proj
    assert report["requantize"]["fused_layers"] == fused


@pytest.mark.parametrize("architecture, form", whole_runs(EXPERT_PARAMETERS))
def test_a_mixture_of_experts_fine_tune_runs_end_to_end_through_gptqmodels_loader(
    tmp_path, tokenizer, text_files, architecture, form
):
    """LoRA on attention and on the fused experts: merged, quantized by gptqmodel one expert at a time, checked and
    scored through gptqmodel's loader in processes of their own (transformers' from_pretrained leaves the GPTQ
    experts unloaded), to the same bar as a dense model."""
    from transformers import AutoModelForCausalLM

    config = whole_run_config(tmp_path, tokenizer, text_files, architecture, form)
    assert main(["run", str(config)]) == EXIT_OK
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    merged, gptq = report["models"]["merged"], report["models"]["gptq"]
    assert abs(merged["delta_pct"]) < 0.5 and merged["kl"] < 1e-3, merged
    assert gptq["kl"] > merged["kl"] and report["requantize"]["check_relative_error"] < 0.5
    assert report["stages"]["merge"]["parameters_merged"] == 2 * EXPERT_PARAMETERS[architecture]
    assert report["requantize"]["loader"] == report["stages"]["score_gptq"]["loader"] == "gptqmodel"
    experts = [key for key in CheckpointReader(run / "gptq").keys() if ".experts." in key and key.endswith("qweight")]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down), each its own GPTQ layer
    variant = report["variants"][0]
    assert variant["loader"] == "gptqmodel" and "GPTQModel.load" in (run / "gptq" / "README.md").read_text()
    assert ("vLLM" in variant["serves_on"]) == (architecture == "qwen3-moe")  # vLLM's Mixtral reads w1/w2/w3
    assert "TGI" not in variant["serves_on"] and "ExLlamaV2" not in variant["serves_on"]
    # what the loader is for: transformers alone finds the fused experts missing and leaves them random
    _, info = AutoModelForCausalLM.from_pretrained(run / "gptq", output_loading_info=True, device_map="cpu")
    assert any(".experts." in key for key in info["missing_keys"])
