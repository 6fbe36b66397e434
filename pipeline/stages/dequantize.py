"""Stage 1, dequantize: the base's weights exactly as the adapter saw them during QLoRA training.

Input: the base checkpoint folder (16-bit safetensors, or already saved in bitsandbytes 4-bit
form) and the bitsandbytes training settings. `DequantizedBase` serves each weight that
bitsandbytes quantized at load time as its 4-bit round trip, tensor by tensor: the merge stage
streams from it directly. `run` writes it out as a 16-bit checkpoint, when a user asks for that
artifact (`base.save_dequantized`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    checkpoint_dtype,
    copy_side_files,
    dtype_of,
    is_bnb_4bit,
    read_model_config,
    rewrite_checkpoint,
    tensor_names,
    write_model_config,
)
from qlora_requant.pipeline.config import BaseSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.model_checks import (
    check_against_config,
    check_layer_count,
    meta_model,
    transformers_config,
)
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.nf4 import (
    QUANT_STATE_SUFFIXES,
    Bnb4bitSettings,
    dequantize_stored,
    quantized_module_names,
    roundtrip_4bit,
)
from qlora_requant.quant.norms import relative_error

log = logging.getLogger(__name__)


def bnb_settings(section: BaseSection) -> Bnb4bitSettings:
    """Bnb4bitSettings from the config's base.bnb section."""
    bnb = section.bnb
    return Bnb4bitSettings(
        quant_type=bnb.quant_type,
        blocksize=bnb.blocksize,
        double_quant=bnb.double_quant,
        compute_dtype=dtype_of(bnb.compute_dtype),
        quant_storage=dtype_of(bnb.quant_storage),
        skip_modules=tuple(bnb.skip_modules),
    )


def load_dtype(section: BaseSection, model_config: dict) -> torch.dtype:
    """The dtype the base was loaded in for training: base.dtype, or the checkpoint's with 'auto'."""
    if section.dtype != "auto":
        return dtype_of(section.dtype)
    return checkpoint_dtype(model_config, section.path / "config.json")


def prequantized_settings(section: BaseSection, quantization: dict) -> Bnb4bitSettings:
    """Settings stored in a bitsandbytes 4-bit checkpoint; refuse a config that contradicts them."""
    stored = dict(
        quant_type=quantization.get("bnb_4bit_quant_type", "nf4"),
        double_quant=bool(quantization.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=quantization.get("bnb_4bit_compute_dtype", "float32"),
        quant_storage=quantization.get("bnb_4bit_quant_storage", "uint8"),
    )
    for key in section.bnb.model_fields_set & stored.keys():
        if getattr(section.bnb, key) != stored[key]:
            raise InputError(
                f"base.bnb.{key} is {getattr(section.bnb, key)!r} but {section.path / 'config.json'} "
                f"was saved with {stored[key]!r}; remove the key or make it match"
            )
    return Bnb4bitSettings(
        quant_type=stored["quant_type"],
        double_quant=stored["double_quant"],
        compute_dtype=dtype_of(stored["compute_dtype"]),
        quant_storage=dtype_of(stored["quant_storage"]),
    )


def check_base(section: BaseSection, model_config: dict) -> None:
    """Refuse a base this stage cannot read: a config.json transformers cannot build a model from (an unknown
    architecture, a value it rejects, more layers than the shard headers hold), quantized other than by
    bitsandbytes 4-bit, or saved in 4-bit with settings the config contradicts."""
    where = section.path / CONFIG
    layers = getattr(transformers_config(model_config, where), "num_hidden_layers", None)
    check_layer_count(layers, tensor_names(section.path), where)  # before a model of that many layers is built
    meta_model(model_config, where)
    quantization = model_config.get("quantization_config")
    if quantization and not is_bnb_4bit(model_config):
        raise InputError(
            f"{section.path / 'config.json'}: base is quantized with "
            f"{quantization.get('quant_method')!r}; give a 16-bit or bitsandbytes 4-bit checkpoint"
        )
    if quantization:
        prequantized_settings(section, quantization)


class DequantizedBase:
    """The base checkpoint read as the adapter saw it in training, one tensor at a time.

    Reads like a CheckpointReader: `get(key)` returns a weight that bitsandbytes quantizes at load
    time as its 4-bit round trip (or, for a checkpoint saved in 4-bit form, its dequantized value),
    and any other tensor cast to the load dtype. The 4-bit math runs on `device`. Nothing is
    dequantized before it is asked for, so merging from this view never holds the whole model.
    """

    def __init__(self, section: BaseSection, device: str = "cpu", allow_pickle: bool = False):
        self.model_dir = section.path
        self.model_config = read_model_config(section.path)
        check_base(section, self.model_config)
        self.device = device
        self.roundtrip_errors: dict[str, float] = {}  # weight -> ||round trip - original|| / ||original||
        self._reader = CheckpointReader(section.path, allow_pickle)
        quantization = self.model_config.get("quantization_config")
        self._packed = (
            {key for key in self._reader.keys() if f"{key}.absmax" in self._reader} if quantization else set()
        )
        self._state_keys = {key + suffix for key in self._packed for suffix in QUANT_STATE_SUFFIXES}
        check_against_config(self.model_config, self, section.path / CONFIG)
        if quantization:
            self.settings = prequantized_settings(section, quantization)
            self.dtype = self._stored_dtype()
            self._quantized: set[str] = set()
            self._conv1d: set[str] = set()
        else:
            self.settings = bnb_settings(section)
            self.dtype = load_dtype(section, self.model_config)
            self._quantized, self._conv1d = self._modules_quantized_at_load()

    def __contains__(self, key: str) -> bool:
        return key in self._reader and key not in self._state_keys

    def keys(self) -> list[str]:
        return [key for key in self._reader.keys() if key not in self._state_keys]

    def shape(self, key: str) -> torch.Size:
        if key in self._packed:
            return torch.Size(self._state(key)["shape"])
        return self._reader.shape(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self._packed:
            state = {
                suffix[1:]: self._reader.get(key + suffix)
                for suffix in QUANT_STATE_SUFFIXES
                if key + suffix in self._reader
            }
            return dequantize_stored(self._reader.get(key).to(self.device), state).cpu()
        tensor = self._reader.get(key)
        if key not in self._quantized:
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        original = tensor.to(self.device, self.dtype)
        transposed = key.removesuffix(".weight") in self._conv1d
        dequantized = roundtrip_4bit(original.T if transposed else original, self.dtype, self.settings)
        dequantized = dequantized.T if transposed else dequantized
        self.roundtrip_errors[key] = relative_error(dequantized, original)
        return dequantized.cpu()

    def quantized_weights(self) -> list[str]:
        """The weights bitsandbytes holds in 4-bit at training load."""
        return sorted(self._packed | self._quantized)

    def in_features(self, key: str) -> int:
        """The input width of a Linear weight (Conv1D weights are stored transposed)."""
        shape = self.shape(key)
        return shape[0] if key.removesuffix(".weight") in self._conv1d else shape[-1]

    def describe(self) -> dict:
        """Where the weights come from and how they were quantized, for the stage summary."""
        return {
            "source": "bitsandbytes 4-bit" if self._packed else "16-bit",
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantized": len(self._packed or self._quantized),
            "settings": {
                "quant_type": self.settings.quant_type,
                "blocksize": self.settings.blocksize,
                "double_quant": self.settings.double_quant,
                "quant_storage": str(self.settings.quant_storage).removeprefix("torch."),
                "skip_modules": list(self.settings.skip_modules),
            },
        }

    def _modules_quantized_at_load(self) -> tuple[set[str], set[str]]:
        config = transformers_config(self.model_config, self.model_dir / CONFIG)
        linear, conv1d = quantized_module_names(config, self.settings)
        expected = {f"{name}.weight" for name in linear | conv1d}
        missing = sorted(expected - set(self._reader.keys()))
        if missing:
            raise InputError(
                f"{self.model_dir}: no tensor {missing[0]!r}, which transformers would quantize; "
                "the checkpoint does not match its config.json"
            )
        return expected, conv1d

    def _state(self, key: str) -> dict:
        suffix = next(s for s in QUANT_STATE_SUFFIXES if s.startswith(".quant_state") and key + s in self._reader)
        return json.loads(bytes(self._reader.get(key + suffix).tolist()))

    def _stored_dtype(self) -> torch.dtype:
        dtypes = {self._state(key)["dtype"] for key in self._packed}
        if len(dtypes) != 1:
            raise InputError(
                f"{self.model_dir}: found {len(self._packed)} 4-bit weights with dtypes "
                f"{sorted(dtypes)}; expected one dtype"
            )
        return dtype_of(dtypes.pop(), str(self.model_dir))


def run(context: StageContext, out: Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write the base as the adapter saw it (see DequantizedBase) into `out` as a 16-bit checkpoint."""
    base = context.inputs.base
    copied = (
        rewrite_checkpoint(base, out, lambda key, reader: {key: reader.get(key)}, max_shard_size, what="dequantize")
        - base.describe()["quantized"]
    )
    write_model_config(base.model_config, out, base.dtype)
    copy_side_files(base.model_dir, out)
    summary = {**base.describe(), "copied": copied}
    log.info(
        "dequantize: %d weights through 4-bit, %d tensors copied, dtype %s",
        summary["quantized"],
        copied,
        summary["dtype"],
    )
    return summary
