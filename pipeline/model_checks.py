"""Whether a base's config.json describes its checkpoint: the model transformers builds from it (a built-in
architecture, values it accepts) compared with the tensors the shards hold (layers, shapes, completeness).
Run by preflight before anything is computed; every refusal names the key or tensor and what to do."""

from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import TensorSource
from qlora_requant.quant.errors import InputError


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


def gptq_loader(model_config: dict) -> str:
    """How a GPTQ checkpoint of this model loads: transformers, or (mixture-of-experts models whose experts
    transformers fuses into 3-D parameters: Mixtral, Qwen-MoE) gptqmodel, whose loader defuses them back into the
    per-expert layers gptqmodel quantized. Plain `from_pretrained` leaves those experts randomly initialised."""
    from qlora_requant.pipeline.parameter_slices import fused_expert_parameters

    return "gptqmodel" if fused_expert_parameters(model_config) else "transformers"
