"""Stage 2, merge: apply the adapter(s), with deltas computed in fp32, to the base's weights.

Input: a tensor source (the base as the adapter saw it, dequantized on the fly, or the original
16-bit checkpoint) and the adapter section (one adapter, or several combined with PEFT's
add_weighted_adapter semantics). Output: a plain checkpoint in the merge dtype that
`AutoModelForCausalLM.from_pretrained` loads without PEFT or quantization.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    TensorSource,
    copy_side_files,
    dtype_of,
    rewrite_checkpoint,
    write_model_config,
)
from qlora_requant.pipeline.config import AdapterSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.parameter_slices import ParameterSlice, parameter_slices
from qlora_requant.pipeline.tokenizer import carry_tokenizer
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.merge import (
    ADAPTER_CONFIG,
    AdapterError,
    LoraAdapter,
    LoraModule,
    ParameterLora,
    combine_adapters,
    embedding_weights,
    expert_delta,
    expert_delta_shape,
    lora_delta,
    lora_delta_shape,
    merge_bias,
    merge_weight,
    peft_targets,
    read_adapter_config,
    read_lora_adapter,
    restrict_to_targets,
    with_token_rows,
)
from qlora_requant.quant.norms import relative_error

log = logging.getLogger(__name__)


def load_adapter(
    section: AdapterSection, base: TensorSource, model_config: dict, allow_pickle: bool = False
) -> LoraAdapter:
    """The adapter(s) of `section` as PEFT loads them onto `base` (the weighted combination of several),
    checked against the base's tensor headers before anything is computed.

    LoRA tensors for modules that PEFT does not target (outside target_modules) are ignored, as PEFT
    ignores them, with a warning; an adapter whose LoRA modules PEFT targets on none of the base's
    modules is refused.
    """
    adapters = []
    for path, weight in section.weighted():
        adapter_config = read_adapter_config(path)
        try:
            targets = peft_targets(adapter_config, model_config)
        except (ValueError, re.error) as exc:  # PEFT's NoMatchingPeftModuleError and bad target patterns
            raise AdapterError(
                f"{path}: {exc} (target_modules / target_parameters in {ADAPTER_CONFIG}); was the adapter trained "
                "on another base model?"
            ) from None
        except Exception as exc:  # PEFT's own code, reading a value of a type it does not expect
            raise AdapterError(
                f"{path / ADAPTER_CONFIG}: PEFT cannot apply it to the base ({type(exc).__name__}: {exc}); fix the "
                "values PEFT did not expect, as PEFT writes them"
            ) from None
        if targets.tied_tokens_on_saved_modules:
            layer = targets.tied_tokens_on_saved_modules[0]
            raise AdapterError(
                f"{path / ADAPTER_CONFIG}: {layer} is in modules_to_save and, since the base ties its embeddings, PEFT "
                f"also gives it a token adapter tied to the embedding's (trainable_token_indices); PEFT cannot run "
                "that model (its forward raises 'TrainableTokensLayer wraps an unknown layer type'), so there is no "
                f"model as trained to reproduce: retrain without {layer} in modules_to_save (the tied token rows "
                "train the new tokens' output rows too)"
            )
        adapter = read_lora_adapter(path, allow_pickle, targets)
        adapter, ignored = restrict_to_targets(adapter, targets.modules)
        if ignored:
            log.warning(
                "%s: ignoring LoRA weights of %d module(s) outside its target_modules, as PEFT does: %s",
                path,
                len(ignored),
                ", ".join(ignored[:4]) + (", ..." if len(ignored) > 4 else ""),
            )
        if not adapter.modules and not adapter.parameters and not adapter.replacements:
            raise AdapterError(
                f"{path}: none of its LoRA weights is for a module its target_modules select on this "
                "base; was the adapter trained on another base model?"
            )
        adapters.append((adapter, weight))
    if len(adapters) == 1:
        combined = adapters[0][0]
    else:
        combined = combine_adapters([a for a, _ in adapters], [w for _, w in adapters], section.combination)
    _check_against_base(combined, base, model_config, section.describe())
    return combined


def run(
    context: StageContext,
    out: Path,
    *,
    dtype: str | None,
    merge_base: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
    """Merge into the NF4 round trip of the base (merge_base nf4), streamed from the base checkpoint, or
    into its original 16-bit weights (original); the merged dtype defaults to the base's load dtype."""
    base = context.inputs.base
    source = base if merge_base == "nf4" else CheckpointReader(base.model_dir, context.allow_pickle)
    summary = merge_checkpoint(
        source,
        base.model_config,
        context.inputs.adapter,
        dtype_of(dtype) if dtype else base.dtype,
        out,
        max_shard_size,
        context.device,
    )
    carry_tokenizer(out, context.inputs.tokenizer_dir, context.trust_remote_code)
    if merge_base == "nf4":
        summary["base"] = {**base.describe(), "roundtrip_error": base.roundtrip_errors}
    return summary


def merge_checkpoint(
    source: TensorSource,
    model_config: dict,
    adapter: LoraAdapter,
    dtype: torch.dtype,
    out_dir: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str = "cpu",
) -> dict:
    """Merge `adapter` (see load_adapter) into the tensors of `source`, writing a `dtype` checkpoint
    with `model_config` into `out_dir`, doing the math on `device`; return a summary."""
    modules_on_device = {name: _to_device(module, device) for name, module in adapter.modules.items()}
    slices = _parameter_slices(adapter, source, model_config)
    changes: dict[str, float] = {}
    input_key, head_key = embedding_weights(model_config)
    tied = head_key is not None and head_key not in source  # the head shares the input embedding's storage
    vocabulary = {"vocab_size": model_config.get("vocab_size"), "tie_word_embeddings": tied}

    def merged_tensors(key: str, reader: TensorSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensor = _adapted(key, adapter, reader)
        if key in slices:
            part = slices[key]
            merged = _merged_slice(tensor, adapter.parameters[part.parameter], part, dtype, device)
            changes[key] = relative_error(merged, tensor)
            return {key: merged}
        outputs = {key: _merged(key, tensor, modules_on_device, dtype, device, changes)}
        if key == input_key:
            vocabulary["vocab_size"] = tensor.shape[0]
            if tied:
                head = _adapted(head_key, adapter, reader, default=adapter.untrained.get(key, reader.get(key)))
                if not torch.equal(head.to(dtype), outputs[key]):  # trained apart from the head: untie them
                    outputs[head_key] = head.to(dtype)
                    vocabulary["tie_word_embeddings"] = False
        return outputs

    def transform(key: str, reader: TensorSource) -> dict[str, torch.Tensor]:
        outputs = merged_tensors(key, reader, dtype)
        for name, tensor in outputs.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise _not_finite(name, merged_tensors(key, reader, torch.float32)[name], dtype)
        return outputs

    rewrite_checkpoint(source, out_dir, transform, max_shard_bytes, what="merge")
    if vocabulary["vocab_size"] != model_config.get("vocab_size") or vocabulary["tie_word_embeddings"] != tied:
        log.info(
            "merge: vocabulary %s, embeddings %s",
            vocabulary["vocab_size"],
            "tied" if vocabulary["tie_word_embeddings"] else "untied",
        )
    write_model_config(
        {**model_config, **vocabulary} if tied or vocabulary["vocab_size"] else model_config, out_dir, dtype
    )
    copy_side_files(source.model_dir, out_dir)
    log.info(
        "merge: %d LoRA modules and %d LoRA parameters merged in fp32 and %d tensors replaced, written as %s",
        len(adapter.modules),
        len(adapter.parameters),
        len(adapter.replacements),
        dtype,
    )
    return {
        "modules_merged": len(adapter.modules),
        "parameters_merged": len(adapter.parameters),
        "tensors_replaced": sorted(adapter.replacements),
        "dtype": str(dtype).removeprefix("torch."),
        "relative_change": dict(sorted(changes.items(), key=lambda item: -item[1])),
    }


def _not_finite(name: str, exact: torch.Tensor, dtype: torch.dtype) -> InputError:
    """The refusal of a merged tensor that is NaN or Inf once cast to `dtype` (`exact`: the same merge in fp32)."""
    finite = exact[torch.isfinite(exact)]
    largest = finite.abs().max().item() if finite.numel() else float("nan")
    if finite.numel() < exact.numel():
        return InputError(
            f"merge: tensor {name!r} is NaN or Inf even when merged in float32 (largest finite magnitude "
            f"{largest:.3g}): the adapter's deltas for it are too large to be a trained LoRA; check the adapter"
        )
    wider = "merge.dtype: float32" if dtype == torch.bfloat16 else "merge.dtype: bfloat16 or float32"
    return InputError(
        f"merge: tensor {name!r} overflows {str(dtype).removeprefix('torch.')} once merged (largest magnitude "
        f"{largest:.3g}, the dtype's limit {torch.finfo(dtype).max:.3g}); set {wider}, or check the adapter"
    )


def _adapted(key: str, adapter: LoraAdapter, reader: TensorSource, default: torch.Tensor | None = None):
    """A base tensor as the fine-tune had it before its LoRA deltas: the adapter's saved copy (resized
    embeddings, modules_to_save) or the base's, with trainable token rows copied in."""
    tensor = adapter.replacements.get(key)
    if tensor is None:
        tensor = reader.get(key) if default is None else default
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(
                f"{reader.model_dir}: tensor {key!r} contains NaN or Inf; the base checkpoint is corrupt; "
                "re-download or re-save it"
            )
    if key in adapter.token_rows:
        tensor = with_token_rows(tensor, *adapter.token_rows[key])
    return tensor


def _parameter_slices(adapter: LoraAdapter, reader: TensorSource, model_config: dict) -> dict[str, ParameterSlice]:
    """The checkpoint tensors that hold the parameters the adapter puts LoRA on (see parameter_slices)."""
    if not adapter.parameters:
        return {}
    return parameter_slices(model_config, reader.keys(), reader.shape, set(adapter.parameters))


def _merged_slice(
    tensor: torch.Tensor, lora: ParameterLora, part: ParameterSlice, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """W + delta for the rows of a LoRA-adapted parameter that one checkpoint tensor holds (one expert's
    projection, or the whole parameter), in fp32, cast once."""
    if part.expert is not None:
        delta = expert_delta(lora, part.expert)[part.start : part.stop]
    elif lora.target.experts > 1:
        delta = torch.stack([expert_delta(lora, expert) for expert in range(lora.target.experts)])
    else:
        delta = expert_delta(lora, 0)
    return (tensor.to(device).float() + delta.to(device)).to(dtype).cpu()


def _merged(
    key: str,
    tensor: torch.Tensor,
    modules: dict[str, LoraModule],
    dtype: torch.dtype,
    device: str,
    changes: dict[str, float],
) -> torch.Tensor:
    """The output tensor: W + delta for a LoRA module's weight (bias likewise), else the tensor cast."""
    module_name, _, kind = key.rpartition(".")
    module = modules.get(module_name)
    if module is not None and kind == "weight":
        tensor = tensor.to(device)
        merged = merge_weight(tensor, lora_delta(module), module, dtype)
        changes[key] = relative_error(merged, tensor)
        return merged.cpu()
    if module is not None and kind == "bias" and module.bias is not None:
        return merge_bias(tensor.to(device), module, dtype).cpu()
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def trained_on_another_base(section: AdapterSection, base_dir: Path, model_id: str | None) -> list[str]:
    """Warnings for adapters whose adapter_config.json names another base (base_model_name_or_path) than
    the base folder or base.model_id: worth a look, not a refusal (a local copy of a hub model has another
    name; the shapes decide, see _check_against_base)."""
    warnings = []
    for path, _ in section.weighted():
        named = read_adapter_config(path).get("base_model_name_or_path")
        known = (base_dir.name, (model_id or "").rsplit("/", 1)[-1])
        if named and named.rstrip("/").rsplit("/", 1)[-1] not in known:
            warnings.append(
                f"{path}: the adapter was trained on {named!r} and is merged into {base_dir}; check that they are "
                "the same model"
            )
    return warnings


def vocabulary_rows(adapter: LoraAdapter, reader: TensorSource, model_config: dict) -> int:
    """Rows of the merged input embedding: the fine-tune's (resized) vocabulary, as saved, or as far as its
    trainable token rows reach past the base's (a resized embedding saved without its layers)."""
    input_key, _ = embedding_weights(model_config)
    saved = adapter.replacements.get(input_key)
    rows = saved.shape[0] if saved is not None else reader.shape(input_key)[0]
    if input_key in adapter.token_rows:
        rows = max(rows, int(adapter.token_rows[input_key][0].max()) + 1)
    return rows


def untrained_new_rows(adapter: LoraAdapter, reader: TensorSource, model_config: dict) -> dict[str, list[int]]:
    """The rows a fine-tune added to its embedding layers (past the base's) that training left as initialised, by
    base tensor name: the input embedding's and, unless tied to it, the output layer's. A row counts as trained when
    trainable_token_indices covers it, the layer has LoRA or is in modules_to_save, or its saved value differs from
    the resized layer's before training; rows PEFT merely saved with a resized layer do not."""
    input_key, head_key = embedding_weights(model_config)
    rows = range(reader.shape(input_key)[0], vocabulary_rows(adapter, reader, model_config))
    keys = [input_key] + ([head_key] if head_key is not None and head_key in reader else [])
    saved_modules = adapter.config.get("modules_to_save") or []
    untrained = {}
    for key in keys:
        module = key.removesuffix(".weight")
        if module in adapter.modules or any(module == name or module.endswith(f".{name}") for name in saved_modules):
            continue
        trained = set(adapter.token_rows[key][0].tolist()) if key in adapter.token_rows else set()
        before, after = adapter.untrained.get(key), adapter.replacements.get(key)
        if before is not None and after is not None and before.shape == after.shape:
            trained |= {row for row in rows if not torch.equal(before[row], after[row])}
        if missing := [row for row in rows if row not in trained]:
            untrained[key] = missing
    return untrained


def _check_against_base(adapter: LoraAdapter, reader: TensorSource, model_config: dict, where: str) -> None:
    """Refuse deltas and saved tensors for tensors the base lacks, or whose shapes differ from the base's
    (the vocabulary rows of the embeddings excepted: a fine-tune may have resized them, consistently)."""
    input_key, head_key = embedding_weights(model_config)
    tied_head = head_key if head_key is not None and head_key not in reader else None
    wanted = [f"{name}.weight" for name in adapter.modules] + list(adapter.replacements) + list(adapter.token_rows)
    wanted += [f"{name}.bias" for name, m in adapter.modules.items() if m.bias is not None]
    absent = sorted(key for key in wanted if key not in reader and key != tied_head)
    if absent:
        raise AdapterError(
            f"{where}: needs {len(absent)} tensor(s) the base does not have, e.g. {absent[0]!r}; "
            "was the adapter trained on another base model?"
        )
    rows = vocabulary_rows(adapter, reader, model_config)

    def target_shape(key: str) -> torch.Size:
        """The shape the adapter's tensors for `key` must have: the base's, with the fine-tune's vocabulary."""
        shape = reader.shape(input_key if key == tied_head else key)
        return torch.Size((rows, *shape[1:])) if key in (input_key, head_key) else shape

    expected = {f"{name}.weight": (lora_delta_shape(m), "delta") for name, m in adapter.modules.items()}
    expected.update({key: (tensor.shape, "saved tensor") for key, tensor in adapter.replacements.items()})
    expected.update(
        {key: ((rows, values.shape[1]), "trainable token rows") for key, (_, values) in adapter.token_rows.items()}
    )
    for key, (shape, what) in sorted(expected.items()):
        if tuple(shape) != tuple(target_shape(key)):
            raise AdapterError(
                f"{where}: {what} for {key} has shape {tuple(shape)} but the base's is "
                f"{tuple(reader.shape(input_key if key == tied_head else key))}; was the adapter trained on "
                "another base model?"
            )
    _check_parameters(adapter, reader, model_config, where)
    for key, (indices, _) in adapter.token_rows.items():
        if int(indices.max()) >= rows:
            raise AdapterError(
                f"{where}: trainable_token_indices reach token {int(indices.max())}, but the vocabulary has {rows} rows"
            )
        saved = adapter.replacements.get(key)
        held = saved.shape[0] if saved is not None else reader.shape(input_key if key == tied_head else key)[0]
        unknown = sorted(set(range(held, rows)) - set(indices.tolist()))
        if unknown:
            raise AdapterError(
                f"{where}: the fine-tune resized {key} to {rows} rows, but rows {unknown[0]}..{unknown[-1]} were "
                "neither saved nor trained (trainable_token_indices), so they cannot be rebuilt; save the adapter "
                "with the resized embeddings (PEFT: save_embedding_layers=True)"
            )


def _check_parameters(adapter: LoraAdapter, reader: TensorSource, model_config: dict, where: str) -> None:
    """Refuse LoRA on raw parameters (target_parameters) that the base's checkpoint does not hold whole, or
    whose checkpoint tensors the deltas do not fit."""
    slices = _parameter_slices(adapter, reader, model_config)
    found = {part.parameter for part in slices.values()}
    absent = sorted(set(adapter.parameters) - found)
    if absent:
        raise AdapterError(
            f"{where}: LoRA on {len(absent)} parameter(s) the base does not have, e.g. {absent[0]!r}; "
            "was the adapter trained on another base model?"
        )
    for key, part in sorted(slices.items()):
        lora = adapter.parameters[part.parameter]
        matrix = expert_delta_shape(lora)
        if part.expert is None:
            expected = (lora.target.experts, *matrix) if lora.target.experts > 1 else matrix
        else:
            expected = (part.stop - part.start, matrix[1])
        if tuple(reader.shape(key)) != tuple(expected) or (part.expert is not None and part.stop > matrix[0]):
            raise AdapterError(
                f"{where}: LoRA on {part.parameter} ({lora.target.experts} expert(s) of {tuple(matrix)}) does not "
                f"fit the base's {key} of shape {tuple(reader.shape(key))}; was the adapter trained on another base "
                "model?"
            )


def _to_device(module: LoraModule, device: str) -> LoraModule:
    """The module with its tensors on `device` (the same object on CPU)."""
    if device == "cpu":
        return module
    moved = {
        f.name: getattr(module, f.name).to(device)
        for f in dataclasses.fields(module)
        if isinstance(getattr(module, f.name), torch.Tensor)
    }
    return dataclasses.replace(module, **moved)
