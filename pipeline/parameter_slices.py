"""Where a model's parameter lives in its checkpoint, when transformers assembles it at load.

transformers 5 holds the experts of Mixtral, Qwen-MoE and kin as one 3-D parameter per projection
(`mlp.experts.gate_up_proj`: experts x (gate + up) x hidden), while their checkpoints store one 2-D
tensor per expert and projection under older names (`block_sparse_moe.experts.3.w1.weight`). Its
conversion mapping renames the keys, stacks the experts (MergeModulelist) and concatenates the
projections (Concatenate). A LoRA delta on the 3-D parameter is written back into those 2-D tensors,
so `parameter_slices` inverts that mapping: for each checkpoint tensor, which expert of which
parameter it holds, and which rows of that expert's matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlora_requant.quant.errors import InputError


@dataclass(frozen=True)
class ParameterSlice:
    """A checkpoint tensor's place in a model parameter: rows [start, stop) of expert `expert`'s matrix,
    or (expert None) the whole parameter, stored under another name or not."""

    parameter: str
    expert: int | None
    start: int
    stop: int


def parameter_slices(
    model_config: dict, checkpoint_keys: list[str], shape: Callable[[str], torch.Size], parameters: set[str]
) -> dict[str, ParameterSlice]:
    """The checkpoint tensors that make up each of `parameters` (model parameter names), by checkpoint key.

    Raises InputError where transformers builds one of them with an operation other than stacking experts
    and concatenating projections (a merge into such a checkpoint would need its inverse), or where the
    checkpoint lacks part of one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        apply_renamings,
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    slices: dict[str, ParameterSlice] = {}
    parts: dict[str, list[tuple[int, int, str]]] = {}  # parameter -> (source pattern index, expert, key)
    for key in checkpoint_keys:
        renamed = apply_renamings(key, renamings)
        if renamed in parameters:
            slices[key] = ParameterSlice(renamed, None, 0, shape(key)[0])
            continue
        for converter in converters:
            name, pattern = converter.rename_source_key(renamed)
            if pattern is None or name not in parameters:
                continue
            operations = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
            if operations not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
                names = ", ".join(type(op).__name__ for op in converter.operations)
                raise InputError(
                    f"transformers builds {name} from {key} with {names}; a LoRA delta on it cannot be merged back "
                    "into this checkpoint"
                )
            index = converter.source_patterns.index(pattern)
            expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
            parts.setdefault(name, []).append((index, int(expert.group(1)), key))
            break

    for name, found in parts.items():
        experts = shapes[name][0]
        patterns = sorted({index for index, _, _ in found})
        by_place = {(index, expert): key for index, expert, key in found}
        missing = [(i, e) for i in patterns for e in range(experts) if (i, e) not in by_place]
        if missing or len(found) != len(by_place):
            raise InputError(
                f"the checkpoint holds {len(found)} tensors for {name}, which has {experts} experts x "
                f"{len(patterns)} projection(s); it does not match its config.json"
            )
        for expert in range(experts):
            start = 0
            for index in patterns:
                key = by_place[(index, expert)]
                rows = shape(key)[0]
                slices[key] = ParameterSlice(name, expert, start, start + rows)
                start += rows
    return slices


def fused_expert_parameters(model_config: dict) -> list[str]:
    """The model's 3-D parameters: experts that transformers stacks into one tensor per projection."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    return [name for name, parameter in model.named_parameters() if parameter.dim() == 3]
