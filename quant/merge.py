"""Reading a PEFT LoRA adapter and merging it into dequantized weights, in fp32.

The math is two pure functions, `lora_delta` and `merge_weight`; `read_lora_adapter` turns an
adapter directory into per-module (A, B, scaling) triples and refuses what it cannot merge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from quant.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(InputError):
    """An adapter this tool cannot merge, with the reason and the file it came from."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted Linear: delta = scaling * B @ A (transposed when fan_in_fan_out)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's scale factor: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(module: LoraModule) -> torch.Tensor:
    """The fp32 weight delta of one LoRA module, in the base weight's layout."""
    delta = module.scaling * (module.lora_b.float() @ module.lora_a.float())
    return delta.T if module.fan_in_fan_out else delta


def merge_weight(weight: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Add an fp32 delta to the fp32 upcast of `weight` and cast once to `out_dtype`."""
    if weight.shape != delta.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} does not match weight shape {tuple(weight.shape)}")
    return (weight.float() + delta).to(out_dtype)


def _refuse_unsupported(config: dict, tensor_names: list[str], where: Path) -> None:
    """Raise AdapterError naming the first adapter feature that the merge does not handle."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: adapter type {peft_type} is not supported; only LORA adapters can be merged")
    refusals = [
        (config.get("use_dora"), "DoRA (use_dora: true)"),
        (config.get("modules_to_save"), f"modules_to_save {config.get('modules_to_save')}"),
        (config.get("bias", "none") != "none", f"bias: {config.get('bias')!r}"),
        (config.get("lora_bias"), "lora_bias: true"),
        (config.get("layer_replication"), "layer_replication"),
        (config.get("target_parameters"), "target_parameters (LoRA on raw parameters)"),
        (config.get("trainable_token_indices"), "trainable_token_indices"),
        (any("lora_embedding_" in n for n in tensor_names), "LoRA on embedding layers (lora_embedding_A/B)"),
    ]
    for present, feature in refusals:
        if present:
            raise AdapterError(f"{where}: {feature} is not supported by the merge yet; retrain without it")
    unknown = [n for n in tensor_names if ".lora_A." not in n and ".lora_B." not in n]
    if unknown:
        raise AdapterError(f"{where}: tensor {unknown[0]!r} is not a LoRA A/B matrix; this adapter cannot be merged")


def read_lora_adapter(adapter_dir: Path) -> dict[str, LoraModule]:
    """Read a PEFT LoRA adapter directory into {base module name: LoraModule}."""
    from peft.utils.other import get_pattern_key

    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: not found; a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads(config_path.read_text())
    tensors = load_file(weights_path)
    _refuse_unsupported(config, list(tensors), weights_path)

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for name_a in sorted(n for n in tensors if ".lora_A." in n):
        module_name = name_a.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        if name_b not in tensors:
            raise AdapterError(f"{weights_path}: {name_a} has no matching {name_b}")
        lora_a, lora_b = tensors[name_a], tensors[name_b]
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), config["lora_alpha"])
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: {module_name} has rank {lora_a.shape[0]} but {ADAPTER_CONFIG} says r={rank}"
            )
        modules[module_name] = LoraModule(
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=lora_scaling(alpha, rank, bool(config.get("use_rslora"))),
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        )
    if not modules:
        raise AdapterError(f"{weights_path}: holds no LoRA matrices")
    return modules
