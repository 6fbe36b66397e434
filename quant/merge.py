"""Reading PEFT LoRA adapters and merging them into dequantized weights, in fp32.

The math is a few pure functions: `lora_delta` (scaling · B @ A), `expert_delta` (the same for one
expert of a parameter that PEFT's target_parameters adapted), `merge_weight` (W + delta, or DoRA's
magnitude-normalized W + delta), `merge_bias` and `combine_adapters` (PEFT's add_weighted_adapter
"linear" and "cat"). `read_lora_adapter` turns an adapter directory into a `LoraAdapter` and
refuses, naming the feature, what it cannot merge.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from qlora_requant.quant.errors import InputError
from qlora_requant.quant.json_files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # trainable_token_indices: the new rows at those indices


class AdapterError(InputError):
    """An adapter this tool cannot merge, with the reason and the file it came from."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted layer of the base.

    Linear: delta = scaling · B @ A, transposed when fan_in_fan_out (Conv1D layout).
    Embedding: A is (r, num_embeddings), B is (dim, r), delta = scaling · (B @ A)ᵀ.
    `magnitude` is DoRA's per-output-row magnitude vector; `bias` is lora_B's bias (lora_bias).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class ParameterTarget:
    """Where PEFT puts LoRA on a raw parameter (target_parameters), as its ParamWrapper records it.

    `prefix` is the wrapper's module path, which prefixes its saved tensors (nested wrappers on one module
    add `.base_layer`); `parameter` is the model's parameter name. A 3-D parameter stacks `experts`
    matrices, each (out, in) when `out_first`, else (in, out); a 2-D one is a plain (out, in) weight.
    """

    prefix: str
    parameter: str
    experts: int
    out_first: bool
    rank: int
    scaling: float


@dataclass(frozen=True)
class PeftTargets:
    """What PEFT injects into the base for an adapter config (see peft_targets), by module path: the LoRA
    modules, the raw parameters with LoRA (by the prefix of their saved tensors), and the modules with
    trainable token rows, each with its row indices and, for a layer tied to the input embedding's (the
    output layer of a tied base), the module whose rows it shares."""

    modules: set[str] = field(default_factory=set)
    parameters: dict[str, ParameterTarget] = field(default_factory=dict)
    token_indices: dict[str, list[int]] = field(default_factory=dict)
    tied_tokens: dict[str, str] = field(default_factory=dict)
    # tied token layers whose base layer is also in modules_to_save: PEFT 0.21 builds them but cannot run them
    tied_tokens_on_saved_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ParameterLora:
    """LoRA on a raw parameter: A is (rank · experts, in), B is (out, rank · experts), as PEFT stores them."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    target: ParameterTarget


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter as the merge needs it: LoRA modules and whole tensors that replace the base's.

    `replacements` holds tensors PEFT saved in full (biases trained with bias="lora_only"/"all",
    modules_to_save, saved embedding layers), keyed by the base checkpoint's tensor name.
    """

    modules: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    # trainable_token_indices: base tensor name -> (row indices, their trained values), which replace those
    # rows (PEFT's TrainableTokensLayer copies them in; despite its name the delta holds the rows themselves).
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # The base as the fine-tune resized it, before training (`.original_module.` / `.base_layer.` copies).
    untrained: dict[str, torch.Tensor] = field(default_factory=dict)
    # target_parameters: LoRA on raw parameters (mixture-of-experts weights), by the model's parameter name
    parameters: dict[str, ParameterLora] = field(default_factory=dict)
    rank: int = 8  # the config's r
    config: dict = field(default_factory=dict, repr=False)  # its adapter_config.json
    use_rslora: bool = False


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's scale factor: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _transposed(module: LoraModule) -> bool:
    return module.fan_in_fan_out or module.embedding


def lora_delta(module: LoraModule) -> torch.Tensor:
    """The fp32 weight delta of one LoRA module, in the base weight's layout."""
    delta = module.scaling * (module.lora_b.float() @ module.lora_a.float())
    return delta.T if _transposed(module) else delta


def lora_delta_shape(module: LoraModule) -> torch.Size:
    """The shape `lora_delta` returns, without computing it."""
    rows, cols = module.lora_b.shape[0], module.lora_a.shape[1]
    return torch.Size((cols, rows) if _transposed(module) else (rows, cols))


def expert_delta(lora: ParameterLora, expert: int) -> torch.Tensor:
    """The fp32 delta of one expert's matrix (the whole weight of a 2-D parameter), in the parameter's layout:
    scaling · B_e @ A_e, where PEFT interleaves the experts as A (experts, rank, in) and B (out, rank, experts)."""
    target = lora.target
    lora_a = lora.lora_a.float().reshape(target.experts, -1, lora.lora_a.shape[-1])[expert]
    lora_b = lora.lora_b.float().reshape(lora.lora_b.shape[0], -1, target.experts)[:, :, expert]
    delta = target.scaling * (lora_b @ lora_a)
    return delta if target.out_first or target.experts == 1 else delta.T


def expert_delta_shape(lora: ParameterLora) -> torch.Size:
    """The shape `expert_delta` returns, without computing it."""
    rows, cols = lora.lora_b.shape[0], lora.lora_a.shape[1]
    out_first = lora.target.out_first or lora.target.experts == 1
    return torch.Size((rows, cols) if out_first else (cols, rows))


def merge_weight(weight: torch.Tensor, delta: torch.Tensor, module: LoraModule, out_dtype: torch.dtype) -> torch.Tensor:
    """W + delta (see lora_delta) in fp32, cast once to `out_dtype`; with DoRA, each output row of
    W + delta is rescaled to the trained magnitude (its norm taken as PEFT takes it, in (out, in))."""
    merged = weight.float() + delta
    if module.magnitude is not None:
        rows = merged.T if module.fan_in_fan_out else merged
        rows = rows * (module.magnitude.float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
        merged = rows.T if module.fan_in_fan_out else rows
    return merged.to(out_dtype)


def merge_bias(bias: torch.Tensor, module: LoraModule, out_dtype: torch.dtype) -> torch.Tensor:
    """The base bias plus scaling · lora_B's bias, in fp32, cast once."""
    return (bias.float() + module.scaling * module.bias.float()).to(out_dtype)


def _refuse_unsupported(config: dict, tensor_names: list[str], where: Path) -> None:
    """Raise AdapterError naming the first adapter feature that the merge does not handle."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: adapter type {peft_type} is not supported; only LORA adapters can be merged")
    dora_embedding = config.get("use_dora") and any(".lora_embedding_" in n for n in tensor_names)
    refusals = [
        (dora_embedding, "DoRA on embedding layers"),
        (config.get("use_dora") and config.get("lora_bias"), "DoRA together with lora_bias"),
        (config.get("layer_replication"), "layer_replication"),
        # aLoRA applies its delta only after the invocation tokens appear; a merged weight applies it everywhere.
        (config.get("alora_invocation_tokens") is not None, "activated LoRA (alora_invocation_tokens)"),
    ]
    for present, feature in refusals:
        if present:
            raise AdapterError(f"{where}: {feature} is not supported by the merge; retrain without it")


def _check_config_values(config: dict, where: Path) -> None:
    """Refuse an adapter_config.json whose LoRA numbers are missing or of a wrong type (as hand edits leave them)."""
    missing = [key for key in ("r", "lora_alpha") if key not in config]
    if missing:
        raise AdapterError(f"{where}: has no {missing[0]!r}; is this a PEFT LoRA adapter_config.json?")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks = [
        (
            "r",
            config["r"],
            isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0,
            "a positive integer",
        ),
        ("lora_alpha", config["lora_alpha"], number(config["lora_alpha"]), "a number"),
    ]
    named = config.get("base_model_name_or_path")
    checks.append(("base_model_name_or_path", named, named is None or isinstance(named, str), "a model id or path"))
    dropout = config.get("lora_dropout", 0.0)
    checks.append(("lora_dropout", dropout, number(dropout) and 0 <= dropout <= 1, "a number from 0 to 1"))
    for key in ("modules_to_save", "target_modules", "exclude_modules", "target_parameters"):
        names = config.get(key)
        checks.append(
            (
                key,
                names,
                names is None
                or isinstance(names, str)
                or (isinstance(names, list) and all(isinstance(n, str) for n in names)),
                "a list of module names, or a pattern",
            )
        )
    for pattern, kind in (("rank_pattern", "integers"), ("alpha_pattern", "numbers")):
        values = config.get(pattern) or {}
        checks.append(
            (
                pattern,
                values,
                isinstance(values, dict) and all(map(number, values.values())),
                f"a mapping of module patterns to {kind}",
            )
        )
    for key, value, valid, expected in checks:
        if not valid:
            raise AdapterError(
                f"{where}: {key} is {value!r}, but must be {expected}; fix adapter_config.json as PEFT writes it"
            )


def peft_targets(adapter_config: dict, model_config: dict) -> PeftTargets:
    """Where PEFT puts its layers for this adapter config: its own matching of target_modules (names, regex,
    all-linear), exclude_modules, layers_to_transform, layers_pattern, target_parameters and
    trainable_token_indices (a list, or a dict per module; on a base with tied embeddings, the tied output layer
    gets a token adapter sharing the embedding's), applied to a weightless copy of the model. PEFT loads no
    adapter tensor for anything else."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = (
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "target_parameters",
        "trainable_token_indices",
        "modules_to_save",
    )
    settings = {key: adapter_config.get(key) for key in keys}
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        if adapter_config.get(key) is not None:
            settings[key] = adapter_config[key]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
        inject_adapter_in_model(LoraConfig(**settings), model)
    targets = PeftTargets()
    token_layers = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TrainableTokensLayer):
            layer = name.removesuffix(".token_adapter")
            token_layers[module] = layer
            targets.token_indices[layer] = list(module.token_indices["default"])
            if module.tied_adapter is not None:
                targets.tied_tokens[layer] = module.tied_adapter
                if isinstance(module.base_layer, ModulesToSaveWrapper):
                    targets.tied_tokens_on_saved_modules.append(layer)
        elif isinstance(module, ParamWrapper):
            targets.parameters[name] = ParameterTarget(
                prefix=name,
                parameter=f"{name.replace('.base_layer', '')}.{module.parameter_name}",
                experts=module.num_experts,
                out_first=bool(getattr(module, "_did_swap_in_out_features", False)),
                rank=module.r["default"],
                scaling=module.scaling["default"],
            )
        elif isinstance(module, BaseTunerLayer):
            targets.modules.add(name)
    targets.tied_tokens.update({layer: token_layers[source] for layer, source in targets.tied_tokens.items()})
    return targets


def embedding_weights(model_config: dict) -> tuple[str, str | None]:
    """The tensor names of the input embedding and the output head's weight, as the model names them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    names = {module: name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    return f"{names[model.get_input_embeddings()]}.weight", f"{names[head]}.weight" if head is not None else None


def restrict_to_targets(adapter: LoraAdapter, targets: set[str]) -> tuple[LoraAdapter, list[str]]:
    """The adapter without LoRA modules that PEFT would not load (outside `targets`), and their names."""
    ignored = sorted(name for name in adapter.modules if name not in targets)
    kept = {name: module for name, module in adapter.modules.items() if name in targets}
    return replace(adapter, modules=kept), ignored


def _base_name(saved_name: str) -> str:
    """The base checkpoint's tensor name for a whole tensor saved in an adapter file."""
    name = saved_name.removeprefix(PEFT_PREFIX)
    for wrapper in (".modules_to_save.", ".token_adapter.base_layer.", ".base_layer."):
        name = name.replace(wrapper, ".")
    return name


def saved_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors an adapter file saved, by base tensor name: modules_to_save and saved embedding
    layers, in every PEFT layout in use (plain keys; 0.21's `.modules_to_save.` copy, which wins over the
    plain key; `.base_layer.` of a wrapped layer). PEFT's `.original_module.` copy is the untrained module:
    not a replacement."""
    whole = {n: t for n, t in tensors.items() if not any(m in n for m in (*LORA_MARKERS, TOKEN_ROWS))}
    saved = {_base_name(n): t for n, t in whole.items() if ".original_module." not in n}
    saved.update({_base_name(n): t for n, t in whole.items() if ".modules_to_save." in n})
    return saved


def _token_rows(tensors: dict[str, torch.Tensor], targets: PeftTargets, config: dict, where: Path) -> dict:
    """Trainable token rows by base tensor name, for the modules PEFT gives token adapters (see PeftTargets). A
    layer tied to another's token adapter takes that adapter's rows, as PEFT's tied layer does, whether or not
    its own copy was saved."""
    rows = {}
    for name, values in tensors.items():
        if not name.endswith(TOKEN_ROWS):
            continue
        module = name.removeprefix(PEFT_PREFIX).removesuffix(TOKEN_ROWS)
        chosen = targets.token_indices.get(module)
        if chosen is None or len(chosen) != len(values):
            raise AdapterError(
                f"{where}: {name} holds {len(values)} rows but PEFT gives {module} "
                f"{'no trainable tokens' if chosen is None else f'{len(chosen)} rows'} from trainable_token_indices "
                f"{config.get('trainable_token_indices')!r} in {ADAPTER_CONFIG}; the adapter files do not belong "
                "together"
            )
        rows[f"{module}.weight"] = (torch.tensor(chosen, dtype=torch.long), values)
    for module, source in targets.tied_tokens.items():
        if f"{source}.weight" in rows:
            rows[f"{module}.weight"] = rows[f"{source}.weight"]
    return rows


def with_token_rows(tensor: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tensor` (an embedding or output layer) with `rows` at `indices`, as PEFT's token adapter merges them;
    grown to reach them when training resized it past the rows the checkpoint holds (every grown row is one of
    `indices`: see stages.merge._check_against_base)."""
    grown = tensor.new_zeros((max(tensor.shape[0], int(indices.max()) + 1), *tensor.shape[1:]))
    grown[: tensor.shape[0]] = tensor
    grown[indices] = rows.to(tensor.dtype)
    return grown


def read_adapter_config(adapter_dir: Path) -> dict:
    """An adapter's adapter_config.json, checked for the LoRA numbers the merge reads."""
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(
            f"{config_path}: not found; a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    config = read_json_object(config_path, AdapterError)
    _check_config_values(config, config_path)
    return config


def read_lora_adapter(adapter_dir: Path, allow_pickle: bool = False, targets: PeftTargets | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory into a LoraAdapter keyed by base module names.

    With `allow_pickle`, an adapter saved only as adapter_model.bin is read with torch's
    weights-only unpickler. An adapter with target_parameters or trainable_token_indices needs `targets` (see
    peft_targets): which saved prefixes are LoRA on raw parameters, with their rank and scaling, and which
    modules carry which token rows.
    """
    from peft.utils.other import get_pattern_key

    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    pickled = adapter_dir / ADAPTER_PICKLE
    if allow_pickle and not weights_path.is_file() and pickled.is_file():
        weights_path = pickled
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = (
                f" (found {ADAPTER_PICKLE}: save it as safetensors, or set allow_pickle: true if you trust it)"
                if pickled.is_file()
                else ""
            )
            raise AdapterError(
                f"{path}: not found{hint}; a PEFT adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
    config = read_adapter_config(adapter_dir)
    if (config.get("target_parameters") or config.get("trainable_token_indices")) and targets is None:
        raise AdapterError(f"{config_path}: has target_parameters or trainable tokens; read it with the base's targets")
    targets = targets or PeftTargets()
    try:
        tensors = (
            torch.load(weights_path, map_location="cpu", weights_only=True)
            if weights_path == pickled
            else load_file(weights_path)
        )
    except Exception as exc:  # safetensors and torch's unpickler raise many types for a bad file
        raise AdapterError(
            f"{weights_path}: cannot be read ({type(exc).__name__}: {exc}); re-save the adapter as safetensors"
        ) from None
    _refuse_unsupported(config, list(tensors), weights_path)
    named = sorted(
        n
        for n in tensors
        if re.search(
            r"\.lora_(A|B|embedding_A|embedding_B)\.[^.]+\.weight$|"
            r"\.lora_embedding_[AB]\.[^.]+$",
            n,
        )
    )
    if named:
        raise AdapterError(
            f"{weights_path}: its keys carry an adapter name (e.g. {named[0]!r}): it is a raw state_dict() of the "
            "PEFT model, not what save_pretrained writes; save the adapter with save_pretrained, or drop the "
            "adapter name ('.default') from its keys"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(
                f"{weights_path}: tensor {name!r} contains NaN or Inf; the adapter is corrupt or "
                "training diverged; use an earlier checkpoint of the adapter"
            )

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    parameters: dict[str, ParameterLora] = {}
    for name_a in sorted(n for n in tensors if ".lora_A." in n or n.endswith(".lora_embedding_A")):
        embedding = name_a.endswith(".lora_embedding_A")
        prefix = name_a.removesuffix(".lora_embedding_A") if embedding else name_a.split(".lora_A.")[0]
        module_name = prefix.removeprefix(PEFT_PREFIX)
        name_b = f"{prefix}.lora_embedding_B" if embedding else f"{prefix}.lora_B.weight"
        if name_b not in tensors:
            raise AdapterError(f"{weights_path}: {name_a} has no matching {name_b}")
        lora_a, lora_b = tensors[name_a], tensors[name_b]
        target = targets.parameters.get(module_name)
        if target is not None:
            parameters[target.parameter] = _parameter_lora(lora_a, lora_b, target, weights_path)
            continue
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), config["lora_alpha"])
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: {module_name} has rank {lora_a.shape[0]} but {ADAPTER_CONFIG} says r={rank}"
            )
        modules[module_name] = LoraModule(
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=lora_scaling(alpha, rank, use_rslora),
            fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
            embedding=embedding,
            magnitude=tensors.get(f"{prefix}.lora_magnitude_vector"),
            bias=tensors.get(f"{prefix}.lora_B.bias"),
        )
    replacements, token_rows = saved_tensors(tensors), _token_rows(tensors, targets, config, weights_path)
    untrained = {_base_name(n): t for n, t in tensors.items() if ".original_module." in n or ".base_layer." in n}
    if not modules and not parameters and not replacements and not token_rows:
        raise AdapterError(f"{weights_path}: holds no LoRA matrices")
    return LoraAdapter(
        modules=modules,
        replacements=replacements,
        token_rows=token_rows,
        untrained=untrained,
        parameters=parameters,
        rank=config["r"],
        use_rslora=use_rslora,
        config=config,
    )


def _parameter_lora(lora_a: torch.Tensor, lora_b: torch.Tensor, target: ParameterTarget, where: Path) -> ParameterLora:
    """LoRA on a raw parameter, its matrices checked against the rank and expert count PEFT gives it."""
    width = target.rank * target.experts
    if lora_a.shape[0] != width or lora_b.shape[1] != width:
        raise AdapterError(
            f"{where}: LoRA on {target.parameter} has {lora_a.shape[0]} rows in lora_A, but PEFT gives it rank "
            f"{target.rank} x {target.experts} expert(s) = {width} from {ADAPTER_CONFIG}"
        )
    return ParameterLora(lora_a=lora_a, lora_b=lora_b, target=target)


def combine_adapters(adapters: list[LoraAdapter], weights: list[float], combination: str) -> LoraAdapter:
    """One adapter equal to PEFT's add_weighted_adapter(adapters, weights, combination_type).

    "cat" stacks the weighted A matrices (w·scaling·A) and the B matrices: the delta is exactly the
    weighted sum of the deltas. "linear" (all adapters of one rank) sums sqrt(|w·scaling|)-weighted
    A and B matrices separately, cross terms included, as PEFT does. The result has r = alpha =
    new rank, so its scaling is 1 (sqrt(new rank) with rsLoRA, as PEFT copies the first config).
    """
    if combination not in ("linear", "cat"):
        raise AdapterError(f"adapter.combination {combination!r} is not supported; use 'linear' or 'cat'")
    for adapter in adapters:
        if (
            adapter.replacements
            or adapter.token_rows
            or adapter.parameters
            or any(m.magnitude is not None or m.bias is not None for m in adapter.modules.values())
        ):
            raise AdapterError(
                "adapters with DoRA, lora_bias, trained biases, modules_to_save or target_parameters cannot be "
                "combined; merge them one at a time"
            )
    if combination == "linear" and len({a.rank for a in adapters}) > 1:
        raise AdapterError(
            f"combination 'linear' needs adapters of one rank, got r={[a.rank for a in adapters]}; use 'cat'"
        )
    new_rank = sum(a.rank for a in adapters) if combination == "cat" else adapters[0].rank
    combined = {}
    for name in sorted(set().union(*(a.modules for a in adapters))):
        parts = [(w, a.modules[name]) for a, w in zip(adapters, weights) if name in a.modules]
        if combination == "cat":
            lora_a = torch.cat([w * m.scaling * m.lora_a.float() for w, m in parts], dim=0)
            lora_b = torch.cat([m.lora_b.float() for _, m in parts], dim=1)
        else:
            factors = [
                (math.copysign(math.sqrt(abs(w * m.scaling)), w * m.scaling), math.sqrt(abs(w * m.scaling)))
                for w, m in parts
            ]
            lora_a = sum(fa * m.lora_a.float() for (fa, _), (_, m) in zip(factors, parts))
            lora_b = sum(fb * m.lora_b.float() for (_, fb), (_, m) in zip(factors, parts))
        first = parts[0][1]
        combined[name] = LoraModule(
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=lora_scaling(new_rank, new_rank, adapters[0].use_rslora),
            fan_in_fan_out=first.fan_in_fan_out,
            embedding=first.embedding,
        )
    return LoraAdapter(modules=combined, rank=new_rank, use_rslora=adapters[0].use_rslora)
