"""The GPTQ checkpoint's README.md, in the Hugging Face model card convention."""

from __future__ import annotations

import yaml

from qlora_requant.eval.report import quality_section
from qlora_requant.eval.schema import Report

MERGE_BASES = {
    "nf4": "the dequantized NF4 weights they were trained against",
    "original": "the original 16-bit weights of the base",
}


def render_model_card(report: Report, base_model: str, model_dir_name: str) -> str:
    """YAML front matter (base model, tags, quantization) followed by the quality table and how to load it."""
    quantization = report.requantize
    front_matter = {
        "base_model": base_model,
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gptq", f"{quantization.bits}-bit", "qlora", "lora-merged", "qlora-requant"],
        "quantization": {"method": "gptq", "tool": "gptqmodel", **quantization.model_dump()},
    }
    gate = report.gate
    adapters = report.config["adapter"]
    adapter_paths = [adapters["path"]] if adapters.get("path") else [a["path"] for a in adapters["adapters"]]
    lines = [
        "---",
        yaml.safe_dump(front_matter, sort_keys=False).strip(),
        "---",
        "",
        f"# {model_dir_name}: {base_model} + QLoRA adapter, merged and GPTQ {quantization.bits}-bit",
        "",
        f"The LoRA adapter(s) {', '.join(f'`{p}`' for p in adapter_paths)} were trained with QLoRA against the "
        f"NF4-quantized `{base_model}`. They were merged in fp32 into {MERGE_BASES[report.merge_base]} "
        "and the result re-quantized with GPTQ "
        f"({quantization.bits}-bit, group size {quantization.group_size}, "
        f"{quantization.calibration_windows} calibration windows of {quantization.calibration_seq_len} tokens).",
        "",
        *quality_section(report),
        f"Release gate: {'PASS' if gate.passed else 'FAIL'}: {gate.message}."
        if gate.enabled
        else "No release gate was configured.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_dir_name}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_dir_name}")',
        "```",
        "",
        "Loading needs `gptqmodel` (or another GPTQ kernel provider supported by transformers) and `optimum`.",
        "",
        f"Made with qlora-requant on {report.created}.",
        "",
    ]
    return "\n".join(lines)
