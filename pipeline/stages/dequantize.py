"""Stage 1, dequantize: the base's weights exactly as the adapter saw them during QLoRA training.

Input: the base checkpoint folder (16-bit safetensors, or already saved in bitsandbytes 4-bit
form) and the bitsandbytes training settings. Output: a 16-bit checkpoint in which every weight
that bitsandbytes quantized at load time is replaced by its 4-bit round trip.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.checkpoint import (DEFAULT_MAX_SHARD_BYTES, CheckpointReader, checkpoint_dtype, copy_side_files,
                                 dtype_of, is_bnb_4bit, read_model_config, rewrite_checkpoint, write_model_config)
from pipeline.config import BaseSection
from quant.errors import InputError
from quant.nf4 import QUANT_STATE_SUFFIXES, Bnb4bitSettings, dequantize_stored, quantized_module_names, roundtrip_4bit

log = logging.getLogger(__name__)


def bnb_settings(section: BaseSection) -> Bnb4bitSettings:
    """Bnb4bitSettings from the config's base.bnb section."""
    bnb = section.bnb
    return Bnb4bitSettings(quant_type=bnb.quant_type, blocksize=bnb.blocksize, double_quant=bnb.double_quant,
                           compute_dtype=dtype_of(bnb.compute_dtype), quant_storage=dtype_of(bnb.quant_storage),
                           skip_modules=tuple(bnb.skip_modules))


def load_dtype(section: BaseSection, model_config: dict) -> torch.dtype:
    """The dtype the base was loaded in for training: base.dtype, or the checkpoint's with 'auto'."""
    if section.dtype != "auto":
        return dtype_of(section.dtype)
    return checkpoint_dtype(model_config, section.path / "config.json")


def prequantized_settings(section: BaseSection, quantization: dict) -> Bnb4bitSettings:
    """Settings stored in a bitsandbytes 4-bit checkpoint; refuse a config that contradicts them."""
    stored = dict(quant_type=quantization.get("bnb_4bit_quant_type", "nf4"),
                  double_quant=bool(quantization.get("bnb_4bit_use_double_quant", False)),
                  compute_dtype=quantization.get("bnb_4bit_compute_dtype", "float32"),
                  quant_storage=quantization.get("bnb_4bit_quant_storage", "uint8"))
    for key in section.bnb.model_fields_set & stored.keys():
        if getattr(section.bnb, key) != stored[key]:
            raise InputError(f"base.bnb.{key} is {getattr(section.bnb, key)!r} but {section.path / 'config.json'} "
                             f"was saved with {stored[key]!r}; remove the key or make it match")
    return Bnb4bitSettings(quant_type=stored["quant_type"], double_quant=stored["double_quant"],
                           compute_dtype=dtype_of(stored["compute_dtype"]),
                           quant_storage=dtype_of(stored["quant_storage"]))


def check_base(section: BaseSection, model_config: dict) -> None:
    """Refuse a base this stage cannot read: quantized other than by bitsandbytes 4-bit, or saved
    in 4-bit with settings the config contradicts."""
    quantization = model_config.get("quantization_config")
    if quantization and not is_bnb_4bit(model_config):
        raise InputError(f"{section.path / 'config.json'}: base is quantized with "
                         f"{quantization.get('quant_method')!r}; give a 16-bit or bitsandbytes 4-bit checkpoint")
    if quantization:
        prequantized_settings(section, quantization)


def run_dequantize(section: BaseSection, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   device: str = "cpu") -> dict:
    """Write the dequantized base into `out_dir`, doing the 4-bit math on `device`; return a summary."""
    model_config = read_model_config(section.path)
    check_base(section, model_config)
    quantization = model_config.get("quantization_config")
    reader = CheckpointReader(section.path)
    if quantization:
        summary = _dequantize_stored_4bit(reader, out_dir, max_shard_bytes, device)
        summary["settings"] = _describe(prequantized_settings(section, quantization))
        dtype = dtype_of(summary["dtype"])
    else:
        dtype = load_dtype(section, model_config)
        summary = _roundtrip_16bit(reader, model_config, bnb_settings(section), dtype, out_dir, max_shard_bytes,
                                   device)
    write_model_config(model_config, out_dir, dtype)
    copy_side_files(section.path, out_dir)
    log.info("dequantize: %d weights through 4-bit, %d tensors copied, dtype %s",
             summary["quantized"], summary["copied"], summary["dtype"])
    return summary


def _roundtrip_16bit(reader: CheckpointReader, model_config: dict, settings: Bnb4bitSettings,
                     dtype: torch.dtype, out_dir: Path, max_shard_bytes: int, device: str) -> dict:
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = model_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise InputError(f"{reader.model_dir / 'config.json'}: model_type {model_type!r} is not an architecture "
                         "built into this transformers version; only built-in architectures are supported")
    config = AutoConfig.for_model(**model_config)
    linear, conv1d = quantized_module_names(config, settings)
    expected = {f"{name}.weight" for name in linear | conv1d}
    missing = sorted(expected - set(reader.keys()))
    if missing:
        raise InputError(f"{reader.model_dir}: no tensor {missing[0]!r}, which transformers would quantize; "
                         f"the checkpoint does not match its config.json")
    counts = {"quantized": 0, "copied": 0}

    def transform(key: str, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        tensor = reader.get(key)
        if key not in expected:
            counts["copied"] += 1
            return {key: tensor.to(dtype) if tensor.is_floating_point() else tensor}
        counts["quantized"] += 1
        if key.removesuffix(".weight") in conv1d:
            return {key: roundtrip_4bit(tensor.T.to(device), dtype, settings).T.cpu()}
        return {key: roundtrip_4bit(tensor.to(device), dtype, settings).cpu()}

    rewrite_checkpoint(reader, out_dir, transform, max_shard_bytes)
    return {"source": "16-bit", "dtype": str(dtype).removeprefix("torch."), "settings": _describe(settings), **counts}


def _dequantize_stored_4bit(reader: CheckpointReader, out_dir: Path, max_shard_bytes: int, device: str) -> dict:
    packed = {key for key in reader.keys() if f"{key}.absmax" in reader}
    state_keys = {f"{key}{suffix}" for key in packed for suffix in QUANT_STATE_SUFFIXES}
    counts = {"quantized": 0, "copied": 0}
    dtypes = set()

    def transform(key: str, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        if key in state_keys:
            return {}
        if key not in packed:
            counts["copied"] += 1
            return {key: reader.get(key)}
        state = {suffix[1:]: reader.get(key + suffix) for suffix in QUANT_STATE_SUFFIXES if key + suffix in reader}
        weight = dequantize_stored(reader.get(key).to(device), state).cpu()
        counts["quantized"] += 1
        dtypes.add(weight.dtype)
        return {key: weight}

    rewrite_checkpoint(reader, out_dir, transform, max_shard_bytes)
    if len(dtypes) != 1:
        raise InputError(f"{reader.model_dir}: found {len(packed)} 4-bit weights with dtypes {dtypes}; expected one dtype")
    return {"source": "bitsandbytes 4-bit", "dtype": str(dtypes.pop()).removeprefix("torch."), **counts}


def _describe(settings: Bnb4bitSettings) -> dict:
    return {"quant_type": settings.quant_type, "blocksize": settings.blocksize, "double_quant": settings.double_quant,
            "quant_storage": str(settings.quant_storage).removeprefix("torch."),
            "skip_modules": list(settings.skip_modules)}
