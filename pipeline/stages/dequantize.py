"""Stage 1, dequantize: the base's weights exactly as the adapter saw them during QLoRA training.

Input: the base checkpoint folder (16-bit safetensors, or already saved in bitsandbytes 4-bit
form) and the bitsandbytes training settings. `DequantizedBase` serves each weight that
bitsandbytes quantized at load time as its 4-bit round trip, tensor by tensor: the merge stage
streams from it directly. `run` writes it out as a 16-bit checkpoint, when a user asks for that
artifact (`base.save_dequantized`).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    TensorSource,
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


def transformers_config(model_config: dict, where: Path):
    """config.json as transformers builds it (a built-in architecture, offline); InputError naming what it refuses."""
    from transformers import CONFIG_MAPPING, AutoConfig, __version__

    model_type = model_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(unknown_architecture(model_type, model_config.get("architectures"), where))
    try:
        return AutoConfig.for_model(**model_config)
    except Exception as exc:  # transformers' strict config validation raises several types
        raise InputError(
            f"{where}: transformers {__version__} refuses it: {' '.join(str(exc).split())}; correct that key, "
            "or give the config.json the weights were saved with"
        ) from None


def unknown_architecture(model_type: object, architectures: object, where: Path) -> str:
    """Why transformers cannot tell the architecture of a config.json, with the names it knows that come close."""
    from transformers import CONFIG_MAPPING, __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class = {name: key for key, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    guess = by_class.get(first) if isinstance(first, str) else None
    known = f" (its architectures {first} is model_type {guess!r})" if guess else ""
    if model_type is None:
        return f"{where}: has no model_type, so transformers cannot tell its architecture; add model_type{known}"
    names = list(CONFIG_MAPPING.keys())
    close = difflib.get_close_matches(str(model_type), names, n=3, cutoff=0.6)
    near = f"; the closest it knows: {', '.join(close)}" if close else ""
    return (
        f"{where}: model_type {model_type!r} is not an architecture transformers {__version__} knows "
        f"({len(names)} built in{near}); set model_type to the base's architecture{known}, or install a "
        "transformers that has it built in (qlora-requant runs built-in architectures only)"
    )


@functools.lru_cache(maxsize=1)
def _cached_meta_model(config_json: str, where: Path):
    return build_meta_model(json.loads(config_json), where)


def meta_model(model_config: dict, where: Path):
    """The causal-LM model transformers builds from config.json, without weights (meta device); built once
    per config. InputError when transformers does not know the architecture or cannot build it."""
    return _cached_meta_model(json.dumps(model_config, sort_keys=True), where)


def build_meta_model(model_config: dict, where: Path):
    """See meta_model (not cached)."""
    from transformers import AutoModelForCausalLM

    config = transformers_config(model_config, where)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a model's constructor asserts or raises what it cannot build
        raise InputError(
            f"{where}: transformers cannot build a causal language model from it ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}); correct config.json, or give the config.json the weights were saved with"
        ) from None


def check_against_config(model_config: dict, source: TensorSource, where: Path) -> None:
    """Refuse a checkpoint whose layers or tensor shapes are not those transformers builds from its config.json.

    Checkpoint names go through transformers' renamings (legacy names); tensors that still map to no model
    tensor (per-expert tensors transformers fuses, buffers it ignores) are not compared, nor tensors the
    checkpoint lacks (a tied lm_head). `source` gives a 4-bit weight's shape before packing.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    model = meta_model(model_config, where)
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = {apply_renamings(key, renamings): key for key in source.keys()}
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    held = [name for name in names if not any(pattern.search(name) for pattern in ignored)]
    built = {name: tensor.shape for name, tensor in model.state_dict().items()}
    layers = getattr(model.config, "num_hidden_layers", None)
    check_layer_count(layers, held, where)
    if isinstance(layers, int):
        check_extra_layers(model, held, layers, where)
    check_complete(model, built, set(names), where)
    wrong = [name for name in built if name in names and source.shape(names[name]) != built[name]]
    if wrong:
        name = wrong[0]
        raise InputError(shape_mismatch(model_config, name, built[name], source.shape(names[name]), where, len(wrong)))


def check_complete(model, built: dict[str, torch.Size], held: set[str], where: Path) -> None:
    """Refuse a checkpoint that lacks a tensor of the model: one it neither holds, nor ties to another, nor (a
    fused 3-D expert parameter) holds as per-expert tensors of the same module."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    held_modules = {name.rsplit(".", depth)[0] for name in held for depth in range(1, name.count(".") + 1)}
    missing = [
        name
        for name in built
        if name not in held
        and name not in tied
        and not (len(built[name]) >= 3 and name.rsplit(".", 1)[0] in held_modules)
        and not any(pattern.search(name) for pattern in ignored)
    ]
    if missing:
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(
            f"{where.parent}: the checkpoint holds no {missing[0]}{others}, which transformers builds from "
            f"{where.name}; give the complete checkpoint, or the {where.name} it was saved with"
        )


LAYER_INDEX = re.compile(r"(.+?)\.(\d+)\.")


def layer_indices(names: list[str]) -> dict[str, set[int]]:
    """For each list of modules the tensor names index ('model.layers'), the indices they hold."""
    found: dict[str, set[int]] = {}
    for name in names:
        match = LAYER_INDEX.match(name)
        if match:
            found.setdefault(match[1], set()).add(int(match[2]))
    return found


def check_layer_count(layers: object, names: list[str], where: Path) -> None:
    """Refuse a num_hidden_layers above the number of layers any list of modules in the checkpoint holds."""
    most = max((len(indices) for indices in layer_indices(names).values()), default=0)
    if names and isinstance(layers, int) and layers > most:
        raise InputError(
            f"{where}: num_hidden_layers is {layers}, but the checkpoint holds tensors for {most} layer(s); set "
            "num_hidden_layers to the layers the weights hold, or give the config.json the weights were saved with"
        )


def check_extra_layers(model, held: list[str], layers: int, where: Path) -> None:
    """Refuse checkpoint tensors of layers past num_hidden_layers in the model's lists of layers ('model.layers')."""
    held_indices = layer_indices(held)
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers and not LAYER_INDEX.match(f"{prefix}."):
            extra = sorted(index for index in held_indices.get(prefix, ()) if index >= layers)
            if extra:
                raise InputError(
                    f"{where}: num_hidden_layers is {layers}, but the checkpoint also holds {prefix} tensors for "
                    f"layer(s) {spans(extra)}; set num_hidden_layers to the layers the weights hold, or give the "
                    "config.json the weights were saved with"
                )


def spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] as '0-2, 5'."""
    runs: list[list[int]] = []  # [first, last]
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(f"{first}-{last}" if last > first else str(first) for first, last in runs)


def shape_mismatch(model_config: dict, name: str, built: torch.Size, held: torch.Size, where: Path, count: int) -> str:
    """Why a tensor's shape is not what config.json makes transformers build, with the keys that would match."""
    fixes = [
        f"{key} {value}"
        + (
            f" (config.json says {old})"
            if key in model_config
            else f" (not in config.json: transformers' default is {old})"
        )
        for key, old, value in sizing_keys(model_config, name, built, held, where)
    ]
    fix = (
        f"with {' or '.join(fixes)} they would match: correct config.json"
        if fixes
        else "correct the config.json keys that size it"
    )
    others = f" (and {count - 1} more tensor(s) differ)" if count > 1 else ""
    return (
        f"{where}: {name} is {list(held)} in the checkpoint, but transformers builds {list(built)} from config.json"
        f"{others}; {fix}, or give the config.json the weights were saved with"
    )


def sizing_keys(
    model_config: dict, name: str, built: torch.Size, held: torch.Size, where: Path
) -> list[tuple[str, int, int]]:
    """(key, value, value that fits) for each integer config key that, scaled as the checkpoint's dimension is to the
    built one, makes transformers build `held` for `name`. Builds a model per candidate: for error messages only
    (the layer count, checked on its own, is not tried)."""
    if len(built) != len(held):
        return []
    found = []
    settings = transformers_config(model_config, where).to_dict()
    for dim_built, dim_held in {(b, h) for b, h in zip(built, held) if b != h and b > 0}:
        for key, value in settings.items():
            if key == "num_hidden_layers" or type(value) is not int or value <= 0 or value * dim_held % dim_built:
                continue
            scaled = value * dim_held // dim_built
            try:
                shape = build_meta_model({**model_config, key: scaled}, where).state_dict()[name].shape
            except (InputError, KeyError):
                continue
            if shape == held and (key, value, scaled) not in found:
                found.append((key, value, scaled))
    return found


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
