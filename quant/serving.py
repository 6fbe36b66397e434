"""Which runtimes serve a GPTQ checkpoint, and with which kernel, from their documented constraints.

Read from each runtime's kernel selection (all for checkpoint_format gptq, int32 packing, as gptqmodel
writes it here):
- vLLM: gptq_marlin for 4/8 bits with sym (group -1/32/64/128, CUDA capability >= 7.5; Machete on SM90);
  otherwise the plain gptq method (exllama-style gptq_gemm, fp16 activations), which takes 2/3/4/8 bits
  and asymmetric zero points (vllm/model_executor/layers/quantization/gptq_marlin.py and gptq.py).
- TGI: GPTQ-Marlin for 4/8 bits with sym; else ExLlama v2 for 4 bits without act-order; else Triton for
  2/4/8 bits; 3 bits is refused (server/text_generation_server/layers/gptq/__init__.py, triton.py,
  layers/marlin/gptq.py).
- ExLlamaV2: 4-bit GPTQ only, with or without act-order and zero points (exllamav2_ext/ext_qmatrix.cpp).
- transformers: every combination, through gptqmodel's kernels (gptqmodel/utils/importer.py).
"""

from __future__ import annotations

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def serving_runtimes(bits: int, group_size: int, desc_act: bool, sym: bool) -> dict[str, str]:
    """Runtime -> the kernel it serves this checkpoint with; runtimes that cannot load it are absent."""
    marlin = bits in (4, 8) and sym and group_size in MARLIN_GROUP_SIZES
    runtimes = {"transformers": "gptqmodel"}
    runtimes["vLLM"] = "gptq_marlin" if marlin else "gptq (gptq_gemm, fp16 only)"
    if marlin:
        runtimes["TGI"] = "gptq-marlin"
    elif bits == 4 and not desc_act:
        runtimes["TGI"] = "exllama v2"
    elif bits in (2, 4, 8):
        runtimes["TGI"] = "triton"
    if bits == 4:
        runtimes["ExLlamaV2"] = "exllamav2"
    return runtimes
