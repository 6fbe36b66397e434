"""Loading the models that are compared, each as the user would load it with transformers."""

from __future__ import annotations

from pathlib import Path

import torch


def device_map(device: str) -> dict[str, str | int]:
    return {"": 0 if device == "cuda" else "cpu"}


def load_separate_adapter(
    base_dir: Path,
    adapters: list[tuple[Path, float]],
    combination: str | None,
    quantization,
    dtype: torch.dtype,
    device: str,
):
    """The model as trained: the base loaded in 4-bit by transformers + bitsandbytes, adapter unmerged (PEFT).

    Several `adapters` (path, weight) are combined with PEFT's add_weighted_adapter(combination).
    `quantization` is a BitsAndBytesConfig, or None when the base checkpoint is already 4-bit: then it
    loads with the quantization_config saved in it (passing None would mean "do not quantize").
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = {"quantization_config": quantization} if quantization is not None else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map=device_map(device), **quantized)
    model = PeftModel.from_pretrained(base, adapters[0][0], adapter_name="adapter0", is_trainable=False)
    if len(adapters) > 1:
        names = [f"adapter{i}" for i in range(len(adapters))]
        for name, (path, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        model.add_weighted_adapter(names, [w for _, w in adapters], "combined", combination_type=combination)
        model.set_adapter("combined")
    return model.eval()


def load_plain(model_dir: Path, device: str, dtype: torch.dtype | str = "auto"):
    """A merged 16-bit or a GPTQ checkpoint, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map(device)).eval()
