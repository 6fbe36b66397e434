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
Mixture-of-experts models whose experts transformers 5 fuses (Mixtral, Qwen3-MoE) are quantized by gptqmodel per
expert and saved under transformers' current names (model.layers.L.mlp.experts.E.gate_proj.qweight):
- transformers loads them only through gptqmodel's loader (GPTQModel.load): plain from_pretrained reports the
  fused experts missing and leaves them random.
- vLLM maps those names for Qwen3-MoE (models/qwen3_moe.py) and serves them with gptq_marlin's fused-MoE method,
  or MoeWNA16 for other 4/8-bit settings; its Mixtral expects block_sparse_moe.experts.E.w1/w2/w3 (models/
  mixtral.py), so not these names. TGI and ExLlamaV2 read Mixtral's old names only and have no Qwen3-MoE.
"""

from __future__ import annotations

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def serving_runtimes(
    bits: int, group_size: int, desc_act: bool, sym: bool, model_type: str | None = None, loader: str = "transformers"
) -> dict[str, str]:
    """Runtime -> the kernel it serves this checkpoint with; runtimes that cannot load it are absent. `loader`:
    how transformers loads it (gptqmodel: a mixture-of-experts checkpoint, see above)."""
    marlin = bits in (4, 8) and sym and group_size in MARLIN_GROUP_SIZES
    if loader == "gptqmodel":
        runtimes = {"transformers": "gptqmodel (GPTQModel.load only)"}
        if model_type == "qwen3_moe" and (marlin or bits in (4, 8)):
            runtimes["vLLM"] = "gptq_marlin (fused MoE)" if marlin else "moe_wna16"
        return runtimes
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
