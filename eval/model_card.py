"""A GPTQ checkpoint's README.md, in the Hugging Face model card convention. It names inputs as published:
the base by base.model_id, the adapter by adapter.model_id (else its folder's name), data by file name."""

from __future__ import annotations

import yaml

from qlora_requant.eval.report import quality_section
from qlora_requant.eval.schema import Report, Variant

MERGE_BASES = {
    "nf4": "the dequantized NF4 weights they were trained against",
    "original": "the original 16-bit weights of the base",
}


def render_model_card(report: Report, variant: Variant) -> str:
    """YAML front matter (base model, tags, quantization) followed by the quality table, where the checkpoint
    serves and how to load it."""
    config = report.config
    base_model = config["base"].get("model_id") or config["base"]["path"]
    adapter = config["adapter"]
    adapters = (
        [adapter["model_id"]]
        if adapter.get("model_id")
        else ([adapter["path"]] if adapter.get("path") else [a["path"] for a in adapter["adapters"]])
    )
    settings = {key: getattr(variant, key) for key in ("bits", "group_size", "desc_act", "sym", "gptaq", "mse")}
    front_matter = {
        "base_model": base_model,
        "base_model_relation": "quantized",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gptq", f"{variant.bits}-bit", "qlora", "lora-merged", "qlora-requant"],
        "quantization": {"method": "gptq", "tool": "gptqmodel", **settings},
    }
    gate, calibration = variant.gate, report.requantize
    calibration_data = config["requantize"]["calibration"].get("path") or config["requantize"]["calibration"]["dataset"]
    group = "per output channel" if variant.group_size == -1 else f"group size {variant.group_size}"
    lines = [
        "---",
        yaml.safe_dump(front_matter, sort_keys=False).strip(),
        "---",
        "",
        f"# {variant.model}: {base_model} + QLoRA adapter, merged and GPTQ {variant.bits}-bit",
        "",
        f"The LoRA adapter(s) {', '.join(f'`{name}`' for name in adapters)} were trained with QLoRA against the "
        f"NF4-quantized `{base_model}`. They were merged in fp32 into {MERGE_BASES[report.merge_base]} "
        f"and the result re-quantized with GPTQ ({variant.bits}-bit, {group}"
        f"{', act-order' if variant.desc_act else ''}{'' if variant.sym else ', asymmetric'}"
        f"{', GPTAQ' if variant.gptaq else ''}, {calibration.calibration_windows} calibration "
        f"{'conversations' if calibration.calibration_format == 'chat' else 'windows'} of up to "
        f"{calibration.calibration_seq_len} tokens from `{calibration_data}`).",
        "",
        *quality_section(report),
        f"This checkpoint is the row `{variant.model}`. "
        + (
            f"Release gate: {'PASS' if gate.passed else 'FAIL'}: {gate.message}."
            if gate.enabled
            else "No release gate was configured."
        ),
        "",
        *(
            [
                "## Task scores",
                "",
                *[
                    f"- {task} ({result.metric}, {result.samples} samples): {result.models[variant.model].value:.4f}, "
                    f"baseline {result.models['baseline'].value:.4f}"
                    for task, result in report.tasks.items()
                    if variant.model in result.models
                ],
                "",
            ]
            if report.tasks
            else []
        ),
        "## Where it serves",
        "",
        *[f"- {runtime}: {kernel}" for runtime, kernel in variant.serves_on.items()],
        "",
        "(From each runtime's documented kernel constraints for these GPTQ settings; runtimes not listed cannot "
        "load it.)",
        "",
        "## How to load",
        "",
        *_how_to_load(variant),
        "",
        f"Made with qlora-requant on {report.created}.",
        "",
    ]
    return "\n".join(lines)


def _how_to_load(variant: Variant) -> list[str]:
    if variant.loader == "gptqmodel":
        return [
            "```python",
            "from gptqmodel import GPTQModel",
            "from transformers import AutoTokenizer",
            "",
            f'model = GPTQModel.load("{variant.model}").model  # a transformers model',
            f'tokenizer = AutoTokenizer.from_pretrained("{variant.model}")',
            "```",
            "",
            "Its experts are quantized one by one: transformers' own `from_pretrained` would leave them unloaded "
            "(randomly initialised), so load it with gptqmodel's loader, as above.",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{variant.model}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{variant.model}")',
        "```",
        "",
        "Loading needs `gptqmodel` (or another GPTQ kernel provider supported by transformers) and `optimum`.",
    ]
