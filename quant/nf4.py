"""The bitsandbytes 4-bit round trip: which weights transformers quantizes, and what they become.

A QLoRA adapter is trained against `dequantize_4bit(quantize_4bit(W))`, not against W. These
functions reproduce that tensor from the 16-bit checkpoint (or from a checkpoint already saved
in bitsandbytes 4-bit form) without building or running the quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnb_functional
import torch

# Suffixes bitsandbytes adds next to a 4-bit "<module>.weight" when it saves a checkpoint.
QUANT_STATE_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


@dataclass(frozen=True)
class Bnb4bitSettings:
    """The bitsandbytes settings a base model was loaded with for training."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8
    skip_modules: tuple[str, ...] = ()

    def to_transformers(self):
        """The equivalent `transformers.BitsAndBytesConfig`."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_quant_storage=self.quant_storage,
            llm_int8_skip_modules=list(self.skip_modules) or None,
        )


def roundtrip_4bit(weight: torch.Tensor, load_dtype: torch.dtype, settings: Bnb4bitSettings) -> torch.Tensor:
    """Quantize `weight` to 4 bits as `Linear4bit` does at load time and dequantize it again.

    The weight is first cast to `load_dtype` (the dtype the model was loaded in), exactly as
    transformers casts checkpoint tensors before handing them to bitsandbytes.
    """
    packed, state = bnb_functional.quantize_4bit(
        weight.to(load_dtype).contiguous(),
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
        quant_storage=settings.quant_storage,
    )
    return bnb_functional.dequantize_4bit(packed, state)


def dequantize_stored(packed: torch.Tensor, state_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize a weight saved by bitsandbytes: the packed data and its quant-state tensors.

    `state_tensors` maps the saved suffixes (see QUANT_STATE_SUFFIXES, without the leading dot)
    to their tensors.
    """
    state = bnb_functional.QuantState.from_dict(dict(state_tensors), device=packed.device)
    return bnb_functional.dequantize_4bit(packed, state)


def quantized_module_names(model_config, settings: Bnb4bitSettings) -> tuple[set[str], set[str]]:
    """Names of the modules transformers replaces with `Linear4bit` when loading with `settings`.

    Returns (linear_names, conv1d_names): Conv1D modules (GPT-2 style) store their weight
    transposed, and transformers transposes it before quantizing. The decision is transformers'
    own: its bitsandbytes quantizer is applied to a weightless (meta) copy of the model.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    quantizer = Bnb4BitHfQuantizer(settings.to_transformers())
    quantizer._process_model_before_weight_loading(model, device_map={"": "cpu"})
    linear, conv1d = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            (conv1d if issubclass(module.source_cls, Conv1D) else linear).add(name)
    return linear, conv1d
