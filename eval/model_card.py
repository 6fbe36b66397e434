"""A GPTQ checkpoint's README.md, a Hugging Face model card written with huggingface_hub's ModelCard. It names
inputs as published: the base by base.model_id, the adapter by adapter.model_id (else its folder's name), data by
file name, and claims no more than the run measured: a quantization of the merged model only when that model is
published (release.merged_model_id), else a fine-tune of the base."""

from __future__ import annotations

from pathlib import Path

from qlora_requant.eval.report import quality_section
from qlora_requant.eval.schema import Report, Variant

MERGE_BASES = {
    "nf4": "the dequantized NF4 weights they were trained against",
    "original": "the original 16-bit weights of the base",
}
REPO_PLACEHOLDER = "YOUR-ORG/YOUR-REPO"  # in the loading example, when release.repo_id is unset
CARD_VERSIONS = ("qlora-requant", "gptqmodel", "transformers", "torch", "peft", "bitsandbytes")


def base_card_license(base_dir: Path) -> str | None:
    """The license the base's own model card (README.md in its folder) declares, if any."""
    from huggingface_hub import ModelCard

    card = Path(base_dir) / "README.md"
    try:
        return ModelCard.load(card).data.license if card.is_file() else None
    except Exception:  # a README that is no model card: no license from it
        return None


def render_model_card(report: Report, variant: Variant, chat: bool) -> str:
    """The card of the GPTQ model `variant`: metadata (base model and relation, license, datasets, quantization),
    the quality rows that concern it, its gates, where it serves and how to load it (`chat`: with a chat example)."""
    from huggingface_hub import ModelCard, ModelCardData

    config, release = report.config, report.config.get("release", {})
    base_model = config["base"].get("model_id") or config["base"]["path"]
    adapter = config["adapter"]
    adapters = (
        [adapter["model_id"]]
        if adapter.get("model_id")
        else ([adapter["path"]] if adapter.get("path") else [a["path"] for a in adapter["adapters"]])
    )
    merged = release.get("merged_model_id")
    repo = (release.get("repo_id") or REPO_PLACEHOLDER).replace("{variant}", variant.model)
    settings = {key: getattr(variant, key) for key in ("bits", "group_size", "desc_act", "sym", "gptaq", "mse")}
    data = ModelCardData(
        base_model=merged or base_model,
        base_model_relation="quantized" if merged else "finetune",
        license=report.license,
        datasets=release.get("datasets") or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gptq", f"{variant.bits}-bit", "qlora", "lora-merged", "qlora-requant"],
        quantization={"method": "gptq", "tool": "gptqmodel", **settings, "dtype": report.requantize.dtype or None},
        qlora_requant={name: report.versions[name] for name in CARD_VERSIONS if name in report.versions},
    )
    gate, calibration = variant.gate, report.requantize
    calibration_data = config["requantize"]["calibration"].get("path") or config["requantize"]["calibration"]["dataset"]
    group = "per output channel" if variant.group_size == -1 else f"group size {variant.group_size}"
    rows = [name for name in ("baseline", "merged", variant.model) if name in report.models]
    what = (
        f"the GPTQ quantization of [`{merged}`](https://huggingface.co/{merged})"
        if merged
        else (f"a fine-tune of `{base_model}`, merged and quantized with GPTQ")
    )
    lines = [
        f"# {variant.model}: {base_model} + QLoRA adapter, merged and GPTQ {variant.bits}-bit",
        "",
        f"This checkpoint is {what}. The LoRA adapter(s) {', '.join(f'`{name}`' for name in adapters)} were trained "
        f"with QLoRA against the NF4-quantized `{base_model}`. They were merged in fp32 into "
        f"{MERGE_BASES[report.merge_base]} and the result re-quantized with GPTQ ({variant.bits}-bit, {group}"
        f"{', act-order' if variant.desc_act else ''}{'' if variant.sym else ', asymmetric'}"
        f"{', GPTAQ' if variant.gptaq else ''}, {calibration.calibration_windows} calibration "
        f"{'conversations' if calibration.calibration_format == 'chat' else 'windows'} of up to "
        f"{calibration.calibration_seq_len} tokens from `{calibration_data}`).",
        "",
        *quality_section(report, rows),
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
        *_how_to_load(variant, repo, chat),
        *(
            []
            if release.get("repo_id")
            else [
                "",
                f"Replace `{REPO_PLACEHOLDER}` with the repository this folder is "
                "published to (release.repo_id writes it here).",
            ]
        ),
        "",
        f"Made with qlora-requant {report.versions.get('qlora-requant', '')} on {report.created} (library versions "
        "in the metadata above).",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _how_to_load(variant: Variant, repo: str, chat: bool) -> list[str]:
    """The loading example: transformers' from_pretrained, or gptqmodel's loader for experts quantized one by one;
    with `chat`, a generation through the chat template."""
    if variant.loader == "gptqmodel":
        loading = [
            "from gptqmodel import GPTQModel",
            "from transformers import AutoTokenizer",
            "",
            f'model = GPTQModel.load("{repo}").model  # a transformers model',
        ]
        note = [
            "Its experts are quantized one by one: transformers' own `from_pretrained` would leave them unloaded "
            "(randomly initialised), so load it with gptqmodel's loader, as above."
        ]
    else:
        loading = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
        ]
        note = ["Loading needs `gptqmodel` (or another GPTQ kernel provider supported by transformers) and `optimum`."]
    conversation = [
        "",
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ").to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    return [
        "```python",
        *loading,
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        *(conversation if chat else []),
        "```",
        "",
        *note,
    ]
