"""Test support shared by every test module: tiny real checkpoints, adapters and configs built offline in
code, and the libraries' own results (oracles) that ours are checked against."""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import DEFAULT_MAX_SHARD_BYTES
from qlora_requant.pipeline.config import BaseSection
from qlora_requant.pipeline.context import Inputs, StageContext
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.stages import dequantize
from qlora_requant.pipeline.stages.dequantize import DequantizedBase, bnb_settings

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Largest difference allowed between two fp32 computations of one merged weight.
FP32_ROUNDING = 1e-6


def save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype | None = torch.bfloat16, **save_kwargs) -> Path:
    """Save `model` (cast to `dtype`; None keeps it, as a 4-bit model must) and `tokenizer` into `out_dir`."""
    (model if dtype is None else model.to(dtype)).save_pretrained(out_dir, **save_kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_LLAMA, **overrides},
    )
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


def base_section(base: Path, **settings) -> dict:
    """The config's base section for the tiny fixtures (fp32 throughout: fast on CPU)."""
    return {"path": str(base), "dtype": "float32", "bnb": {"compute_dtype": "float32"}, **settings}


def write_config(
    path: Path, base_dir: Path, adapter_dir: Path, texts: dict[str, Path], output_dir: Path, **sections
) -> Path:
    """A valid YAML run config for the tiny fixtures; `sections` replace whole top-level sections."""
    import yaml

    config = {
        "output_dir": str(output_dir),
        "device": "cpu",
        "base": base_section(base_dir),
        "adapter": {"path": str(adapter_dir)},
        "merge": {"dtype": "float16"},
        "requantize": {
            "bits": 4,
            "group_size": 64,
            "batch_size": 4,
            "calibration": {"path": str(texts["calibration"]), "n_samples": 16, "seq_len": 64},
        },
        "evaluation": {
            "text": {"path": str(texts["eval"])},
            "seq_len": 64,
            "max_windows": 24,
            "prompts": ["The quick", "Return the"],
            "max_new_tokens": 6,
        },
    }
    config.update(sections)
    path.write_text(yaml.safe_dump(config))
    return path


def stage_context(section: BaseSection, run_dir: Path, device: str = "cpu") -> StageContext:
    """What the stages are called with, for a run directory `run_dir` of the base in `section` (no adapter)."""
    return StageContext(
        device=device,
        layout=RunLayout(run_dir),
        inputs=Inputs(base=DequantizedBase(section, device), adapter=None, calibration_texts=[], eval_texts=[]),
    )


def dequantize_to(section: BaseSection, out: Path, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """The dequantize stage writing the base of `section` into the existing folder `out`."""
    return dequantize.run(stage_context(section, out.parent), out, max_shard_size=max_shard_size)


def library_dequantized(model_dir, section: BaseSection, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """dequantize_4bit of every Linear4bit that transformers builds at load, before any forward pass."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoModelForCausalLM

    quantization = bnb_settings(section).to_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype, device_map="cpu"
    )
    return {
        f"{name}.weight": bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def peft_merged(model_dir, adapter_dir, weights=None, combination=None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on the fp32 model; several adapters go through add_weighted_adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter_dirs = adapter_dir if isinstance(adapter_dir, list) else [adapter_dir]
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    if len(adapter_dirs) > 1:
        names = [f"a{i}" for i in range(len(adapter_dirs))]
        for name, path in zip(names[1:], adapter_dirs[1:]):
            peft_model.load_adapter(path, adapter_name=name)
        peft_model.add_weighted_adapter(names, weights, "combined", combination_type=combination)
        peft_model.set_adapter("combined")
    return peft_model.merge_and_unload().state_dict()


REPORT_SCHEMA = Path(__file__).resolve().parents[1] / "report.schema.json"


def validate_report(report_json_path: Path) -> None:
    """Check a report.json against report.schema.json at the repository root (JSON Schema 2020-12, as pydantic
    writes it); raises jsonschema.ValidationError where it does not match."""
    import json

    import jsonschema

    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.validate(json.loads(Path(report_json_path).read_text()), schema, cls=jsonschema.Draft202012Validator)
