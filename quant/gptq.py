"""GPTQ re-quantization through gptqmodel, the maintained successor of auto-gptq, and the checks that its
output is a checkpoint plain transformers loads and runs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Fused Linear layers that gptqmodel 7.6 saves split into parts (its model definitions quantize the parts;
# e.g. Phi-3's gate_up_proj), while transformers' modules, and so every runtime, expect the fused name.
SPLIT_ON_SAVE = {"gate_up_proj": ("gate_proj", "up_proj")}
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
# CPU kernels of gptqmodel 7.6 that transformers can be asked for (quantization_config backend), tried in
# this order when the one transformers picks does not run the checkpoint.
CPU_BACKENDS = ("gptq_torch_fused", "gptq_torch_int8", "gptq_torch")


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ settings: the format's (bits, group_size, desc_act, sym, written into quantization_config) and the
    algorithm's, which change the numbers only (see pipeline/config.py, GptqSection)."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    batch_size: int = 8
    gptaq: bool = False
    mse: float = 0.0
    act_group_aware: bool | None = None
    static_groups: bool = False

    def quantize_config(self, offload_to_disk: bool) -> dict:
        """gptqmodel QuantizeConfig arguments."""
        from gptqmodel.quantization.config import GPTAQConfig

        # gptqmodel turns act_group_aware on by default, which needs groups and no desc_act.
        act_group_aware = self.act_group_aware
        if act_group_aware is None and (self.group_size == -1 or self.desc_act):
            act_group_aware = False
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "mse": self.mse,
            "static_groups": self.static_groups,
            "offload_to_disk": offload_to_disk,
            **({"act_group_aware": act_group_aware} if act_group_aware is not None else {}),
            **({"gptaq": GPTAQConfig(alpha=0.25)} if self.gptaq else {}),
        }


def gptq_dtypes(merged: torch.dtype, device: str, release: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """(compute, release) dtypes of a GPTQ run on a checkpoint stored in `merged`. GPTQ runs in the merged dtype
    where that is fast: bfloat16 and float32 anywhere, float16 on CUDA; a float16 checkpoint on CPU runs in float32
    (exact too: CPU float16 kernels are slow, and bfloat16 would round the weights). The release, the dtype of the
    checkpoint's unquantized tensors and config.json, is the merged dtype unless `release` names another."""
    compute = torch.float32 if merged == torch.float16 and device == "cpu" else merged
    return compute, merged if release == "auto" else getattr(torch, release)


def gptq_quantize(
    model_dir: Path,
    calibration: list[dict[str, torch.Tensor]],
    settings: GptqSettings,
    device: str,
    out_dir: Path,
    log_dir: Path,
    dtypes: tuple[torch.dtype, torch.dtype],
    trust_remote_code: bool = False,
    offload_to_disk: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> None:
    """Quantize the 16-bit checkpoint in `model_dir` on `calibration` windows and save it to `out_dir`, computing
    in and releasing in `dtypes` (see gptq_dtypes).

    gptqmodel's per-module logs (GPTQ loss per layer) go to `log_dir` instead of ./logs. With
    `offload_to_disk` (gptqmodel's default), layers wait on disk rather than in memory; its loader finds
    them only under the model's own tensor names, not under legacy names a checkpoint may use.
    `on_layer(k, n)` is called when gptqmodel's layer loop reaches decoder layer k (1-based) of n.
    """
    # gptqmodel sizes its CPU worker pool at import; with 2 cores or fewer it refuses to start without this.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper import loop_processor

    # gptqmodel 7.6 writes these logs under a module-level relative path; point it at the run.
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = log_dir

    # gptqmodel's own offload folder is a TemporaryDirectory removed only when the interpreter exits normally, which
    # a stage's process does not (it ends as a forked child): the layers it offloads go to a folder removed here.
    offload = tempfile.TemporaryDirectory(prefix="qlora-requant-gptq-offload-") if offload_to_disk else None
    extra = {"offload_to_disk_path": offload.name} if offload else {}
    config = QuantizeConfig(**settings.quantize_config(offload_to_disk), **extra)
    batch_size = settings.batch_size
    if settings.gptaq and len({sample["input_ids"].shape[-1] for sample in calibration}) > 1:
        # gptqmodel 7.6's GPTAQ pairs each batch's unquantized inputs with its quantized ones, and padded
        # batches of samples of unequal length do not line up (a shape error): one sample per batch.
        batch_size = 1
    try:
        compute, release = dtypes
        model = GPTQModel.load(
            str(model_dir), config, device=device, dtype=compute, trust_remote_code=trust_remote_code
        )
        with _layer_progress(model, on_layer):
            logs = model.quantize(calibration, batch_size=batch_size)
        if not model.quant_log and isinstance(logs, dict):
            # gptqmodel 7.6 keeps the per-module log, which save writes as quant_log.csv, of GPTQ only: GPTAQ's too
            model.quant_log = logs.get("gptaq", [])
        model.save(str(out_dir))
    finally:
        if offload is not None:
            offload.cleanup()
    if release != compute:
        cast_unquantized(out_dir, release)


def cast_unquantized(checkpoint: Path, dtype: torch.dtype) -> None:
    """Store a GPTQ checkpoint's unquantized floating-point tensors (embeddings, norms, head, biases) in `dtype`
    and say so in its config.json; the GPTQ tensors keep the format's dtypes (scales are float16 in it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sizes = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(shard, "pt") as reader:
            metadata = reader.metadata()
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not name.endswith(".scales"):
                tensors[name] = tensor.to(dtype)
        sizes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        save_file(tensors, shard, metadata=metadata)
    name = str(dtype).removeprefix("torch.")
    config = json.loads((checkpoint / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        content = json.loads(index.read_text())
        content.setdefault("metadata", {})["total_size"] = sizes
        index.write_text(json.dumps(content, indent=2) + "\n")


@contextmanager
def _layer_progress(model, on_layer: Callable[[int, int], None] | None) -> Iterator[None]:
    """Call `on_layer(k, n)` the first time gptqmodel's loop runs decoder layer k of n (it quantizes layer by
    layer, each to the end before the next starts)."""
    if on_layer is None:
        yield
        return
    from gptqmodel.utils.model import get_layers_with_prefixes

    layers = get_layers_with_prefixes(model.model, model.extract_layers_node())[0]
    reached = [0]

    def entered(index: int) -> None:
        if index + 1 > reached[0]:
            reached[0] = index + 1
            on_layer(index + 1, len(layers))

    hooks = [
        layer.register_forward_pre_hook(lambda *_, index=index: entered(index)) for index, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def uses_model_names(model_config: dict, tensor_names: list[str]) -> bool:
    """Whether a checkpoint names its tensors as transformers' model does (GPT-NeoX checkpoints, for one,
    keep the legacy embed_out for the model's lm_head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config))
    return set(tensor_names) <= set(model.state_dict())


def fuse_split_layers(reader, fused_modules: set[str]) -> dict[str, list[str]]:
    """Which saved GPTQ tensors to join back into fused layers: {fused tensor: [part tensors in order]}.

    `reader` holds the GPTQ checkpoint's tensors; `fused_modules` are the merged model's Linear modules.
    A fused module saved as parts gets its parts' tensors concatenated along the output dimension (the
    last one of qweight, qzeros and scales; bias), and the parts' shared g_idx once.
    """
    joins = {}
    for module in sorted(fused_modules):
        prefix, _, name = module.rpartition(".")
        parts = SPLIT_ON_SAVE.get(name)
        if not parts or f"{module}.qweight" in reader or f"{prefix}.{parts[0]}.qweight" not in reader:
            continue
        for tensor in GPTQ_TENSORS:
            names = [f"{prefix}.{part}.{tensor}" for part in parts]
            if all(n in reader for n in names):
                joins[f"{module}.{tensor}"] = names[:1] if tensor == "g_idx" else names
    return joins


def join_tensors(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One fused GPTQ tensor from its parts (see fuse_split_layers)."""
    if name.endswith(".g_idx"):
        return parts[0]
    return torch.cat(parts, dim=0 if name.endswith(".bias") else -1).contiguous()


def check_checkpoint(spec: dict, reporter=None) -> dict:
    """Load a GPTQ checkpoint as the evaluation loads it and compare its logits on some tokens with the merged
    model's. Meant for a fresh process of its own (a failing kernel may abort the interpreter).

    `spec`: gptq_dir, merged_dir, input_ids, device, backend (a gptqmodel kernel for transformers to use; empty:
    the one it picks) and loader (transformers, or gptqmodel's own loader for mixture-of-experts checkpoints).
    Returns {kernel, finite, relative_error} (||logits - merged|| / ||merged - mean(merged)||), or {missing} when
    weights did not load.
    """
    from transformers import AutoModelForCausalLM, GPTQConfig

    ids = torch.tensor(spec["input_ids"]).unsqueeze(0)
    device = spec["device"]
    place = {"": 0 if device == "cuda" else "cpu"}
    with torch.no_grad():  # the merged model first: gptqmodel's loader patches transformers' expert blocks for good
        merged = AutoModelForCausalLM.from_pretrained(spec["merged_dir"], dtype=torch.float32, device_map=place)
        reference = merged(ids.to(merged.device)).logits.float().cpu()
        del merged
    if spec["loader"] == "gptqmodel":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from gptqmodel import GPTQModel

        dtype = torch.float32 if device == "cpu" else None
        model = GPTQModel.load(str(spec["gptq_dir"]), device="cuda:0" if device == "cuda" else "cpu", dtype=dtype).model
    else:
        options = {}
        if spec["backend"]:
            quantization = json.loads((spec["gptq_dir"] / "config.json").read_text())["quantization_config"]
            keys = ("bits", "group_size", "desc_act", "sym")
            options["quantization_config"] = GPTQConfig(**{k: quantization[k] for k in keys}, backend=spec["backend"])
        dtype = torch.float32 if device == "cpu" else "auto"
        model, info = AutoModelForCausalLM.from_pretrained(
            spec["gptq_dir"], dtype=dtype, device_map=place, output_loading_info=True, **options
        )
        if info["missing_keys"]:
            return {"missing": sorted(info["missing_keys"])}
    kernel = next(type(m).__name__ for m in model.modules() if hasattr(m, "qweight"))
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits.float().cpu()
    error = ((logits - reference).norm() / (reference - reference.mean()).norm()).item()
    return {"kernel": kernel, "finite": bool(torch.isfinite(logits).all()), "relative_error": error}
