"""Loading the models that are compared, each as the user would load it with transformers: on the run's device,
or placed by accelerate over the GPUs, the CPU and the disk."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_requant.eval.perplexity import input_device


@dataclass(frozen=True)
class Placement:
    """Where a model goes: the run's device, or (`auto`) accelerate's placement within `max_memory`, modules
    past it offloaded to `offload_folder`."""

    device: str = "cpu"
    auto: bool = False
    max_memory: dict[str | int, int] | None = None
    offload_folder: Path | None = None

    def options(self) -> dict:
        """from_pretrained's placement arguments."""
        if not self.auto:
            return {"device_map": {"": 0 if self.device == "cuda" else "cpu"}}
        options = {"device_map": "auto", "offload_folder": str(self.offload_folder)}
        return {**options, "max_memory": self.max_memory} if self.max_memory else options


def evaluation_placement(section, device: str, offload_folder: Path) -> Placement:
    """Where the evaluation section (EvaluationSection) places each scored model."""
    return Placement(device, section.device_map == "auto", section.accelerate_max_memory(), offload_folder)


def plain_dtype(name: str, device: str) -> torch.dtype | str:
    """The compute dtype of the merged and GPTQ models (see EvaluationSection.dtype)."""
    if name != "auto":
        return getattr(torch, name)
    return torch.float32 if device == "cpu" else "auto"


def placed(model, placement: Placement) -> dict[str, int]:
    """Device -> how many modules accelerate placed there (the whole model counts as one on a single device)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or not placement.auto:
        return {"cuda:0" if placement.device == "cuda" else "cpu": 1}
    return dict(Counter(f"cuda:{where}" if isinstance(where, int) else str(where) for where in device_map.values()))


def load_separate_adapter(
    vocabulary: int,
    base_dir: Path,
    adapters: list[tuple[Path, float]],
    combination: str | None,
    quantization,
    dtype: torch.dtype,
    placement: Placement,
):
    """The model as trained: the base loaded in 4-bit by transformers + bitsandbytes, its embeddings resized to
    the fine-tune's `vocabulary` (as training did; the adapter carries the rows), adapter unmerged (PEFT).

    Several `adapters` (path, weight) are combined with PEFT's add_weighted_adapter(combination).
    `quantization` is a BitsAndBytesConfig, or None when the base checkpoint is already 4-bit: then it
    loads with the quantization_config saved in it (passing None would mean "do not quantize").
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = {"quantization_config": quantization} if quantization is not None else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **placement.options(), **quantized)
    if vocabulary != base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(vocabulary, mean_resizing=False)
    model = PeftModel.from_pretrained(base, adapters[0][0], adapter_name="adapter0", is_trainable=False)
    if len(adapters) > 1:
        names = [f"adapter{i}" for i in range(len(adapters))]
        for name, (path, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        model.add_weighted_adapter(names, [w for _, w in adapters], "combined", combination_type=combination)
        model.set_adapter("combined")
    return model.eval()


def load_plain(model_dir: Path, placement: Placement, dtype: torch.dtype | str = "auto"):
    """A merged 16-bit or a GPTQ checkpoint, loaded by plain transformers.

    A GPTQ checkpoint whose weights do not all load, or that fails a first forward pass, with the kernel
    transformers picks is loaded with the next gptqmodel CPU kernel that runs it (the requantize stage
    checked that one does, in the same order).
    """
    import json

    from transformers import AutoModelForCausalLM, GPTQConfig

    from qlora_requant.quant.gptq import CPU_BACKENDS

    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if not quantization:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **placement.options()).eval()
    for backend in ("", *CPU_BACKENDS) if placement.device == "cpu" else ("",):
        options = {}
        if backend:
            keys = ("bits", "group_size", "desc_act", "sym")
            options["quantization_config"] = GPTQConfig(**{k: quantization[k] for k in keys}, backend=backend)
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, output_loading_info=True, **placement.options(), **options
        )
        try:
            if not info["missing_keys"]:
                with torch.no_grad():
                    model(torch.zeros(1, 8, dtype=torch.long, device=input_device(model)))
                return model.eval()
        except (RuntimeError, IndexError, ValueError):
            pass
    raise RuntimeError(f"{model_dir}: no gptqmodel kernel runs this checkpoint")


def load_checkpoint(model_dir: Path, placement: Placement, dtype: torch.dtype | str, loader: str):
    """A checkpoint of the run loaded as its users load it: by plain transformers (see load_plain), or a GPTQ
    mixture-of-experts checkpoint by gptqmodel's loader (`loader`: see pipeline/model_checks.gptq_loader), on the
    run's device (accelerate's placement does not apply to it)."""
    if loader == "transformers":
        return load_plain(model_dir, placement, dtype)
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on one or two cores without it
    from gptqmodel import GPTQModel

    device = "cuda:0" if placement.device == "cuda" else "cpu"
    model = GPTQModel.load(str(model_dir), device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None).model
    model.generation_config.do_sample = False  # gptqmodel's loader turns sampling on; continuations are greedy
    return model.eval()
