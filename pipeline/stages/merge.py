"""Stage 2, merge: add the LoRA deltas, computed in fp32, to the dequantized weights.

Input: the dequantized checkpoint and the adapter folder. Output: a plain checkpoint in the
merge dtype that `AutoModelForCausalLM.from_pretrained` loads without PEFT or quantization.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.checkpoint import (DEFAULT_MAX_SHARD_BYTES, CheckpointReader, copy_side_files, dtype_of, read_model_config,
                                 rewrite_checkpoint, write_model_config)
from quant.merge import AdapterError, lora_delta, merge_weight, read_lora_adapter

log = logging.getLogger(__name__)


def run_merge(dequantized_dir: Path, adapter_dir: Path, dtype_name: str | None, out_dir: Path,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Merge the adapter in `adapter_dir` into `dequantized_dir`, writing `out_dir`; return a summary."""
    modules = read_lora_adapter(adapter_dir)
    model_config = read_model_config(dequantized_dir)
    dtype = dtype_of(dtype_name or model_config["dtype"])
    reader = CheckpointReader(dequantized_dir)
    absent = sorted(name for name in modules if f"{name}.weight" not in reader)
    if absent:
        raise AdapterError(f"{adapter_dir}: targets {len(absent)} module(s) the base does not have, e.g. "
                           f"{absent[0]!r}; was the adapter trained on another base model?")
    largest: list[tuple[float, str]] = []

    def transform(key: str, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        tensor = reader.get(key)
        module = modules.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if module is None:
            return {key: tensor.to(dtype) if tensor.is_floating_point() else tensor}
        delta = lora_delta(module)
        if delta.shape != tensor.shape:
            raise AdapterError(f"{adapter_dir}: delta for {key} has shape {tuple(delta.shape)} but the base weight "
                               f"is {tuple(tensor.shape)}; was the adapter trained on another base model?")
        largest.append((delta.abs().max().item(), key))
        return {key: merge_weight(tensor, delta, dtype)}

    rewrite_checkpoint(reader, out_dir, transform, max_shard_bytes)
    write_model_config(model_config, out_dir, dtype)
    copy_side_files(dequantized_dir, out_dir)
    log.info("merge: %d LoRA modules merged in fp32, written as %s", len(modules), dtype)
    return {"modules_merged": len(modules), "dtype": str(dtype).removeprefix("torch."),
            "largest_deltas": [{"weight": k, "max_abs_delta": v} for v, k in sorted(largest, reverse=True)[:5]]}
