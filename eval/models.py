"""Loading the models that are compared, each as the user would load it with transformers."""

from __future__ import annotations

from pathlib import Path

import torch


def device_map(device: str) -> dict[str, str | int]:
    return {"": 0 if device == "cuda" else "cpu"}


def load_separate_adapter(
    vocabulary: int,
    base_dir: Path,
    adapters: list[tuple[Path, float]],
    combination: str | None,
    quantization,
    dtype: torch.dtype,
    device: str,
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
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map=device_map(device), **quantized)
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


def load_plain(model_dir: Path, device: str, dtype: torch.dtype | str = "auto"):
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
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map(device)).eval()
    for backend in ("", *CPU_BACKENDS) if device == "cpu" else ("",):
        options = {}
        if backend:
            keys = ("bits", "group_size", "desc_act", "sym")
            options["quantization_config"] = GPTQConfig(**{k: quantization[k] for k in keys}, backend=backend)
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map=device_map(device), output_loading_info=True, **options
        )
        try:
            if not info["missing_keys"]:
                with torch.no_grad():
                    model(torch.zeros(1, 8, dtype=torch.long, device=model.device))
                return model.eval()
        except (RuntimeError, IndexError, ValueError):
            pass
    raise RuntimeError(f"{model_dir}: no gptqmodel kernel runs this checkpoint")
