"""The typed schema of report.json, the quality report of a run.

pipeline/stages/report.py builds a `Report` (validated when built) and writes report.json as its dump; report.md,
report.html, the model card and the console read the same `Report`. Scripts can load report.json with
`Report.model_validate_json`, or check it against report.schema.json at the repository root: the JSON Schema
of `Report`. After changing a model here, regenerate that file (a test fails while it is stale):

    python -m qlora_requant.eval.schema > report.schema.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonDict, SkipJsonSchema

from qlora_requant.eval.compare import BASELINE

SCHEMA_VERSION = 4  # Report.schema_version; raise both when a change breaks readers of report.json

GateName = Literal["max_ppl_increase_pct", "max_kl", "min_top1_agreement", "max_task_drop"]


def _no_default(schema: JsonDict) -> None:
    del schema["default"]


def _omitted(description: str) -> Any:
    """A field that report.json leaves out where it does not apply; never written as null."""
    return Field(None, description=description, exclude_if=lambda value: value is None, json_schema_extra=_no_default)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _interval(description: str) -> Any:
    """A row's interval against the baseline: absent on the baseline's own row, null where none could be computed."""
    return Field(None, description=description, json_schema_extra=_no_default)


class _Compared(_Closed):
    """A row of a table compared with the baseline: its interval (`interval_field`) is written as given, null where
    none could be computed, and left out where it was never given (the baseline's own row)."""

    interval_field: ClassVar[str]

    @model_serializer(mode="wrap")
    def _interval_where_compared(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.interval_field not in self.model_fields_set:
            data.pop(self.interval_field, None)
        return data


class Protocol(_Closed):
    """How every model was scored: the same token windows of the evaluation text for all."""

    kind: Literal["sliding windows", "non-overlapping windows", "conversations"] = Field(
        description="How windows are cut: from the joined text, or one per chat record (rendered with the chat "
        "template, right-padded)."
    )
    seq_len: int = Field(description="Tokens per window (at most, for conversations).")
    stride: int | None = Field(description="Tokens between sliding windows; null for non-overlapping windows.")
    bos: bool = Field(description="Whether a BOS token is prepended to each window of text.")
    score: Literal["all", "assistant"] = Field(
        description="Which tokens are scored: all, or (chat data) only the assistant turns'."
    )
    assistant_tokens: Literal["generation blocks", "assistant turns"] | None = Field(
        default=None,
        description="With score: assistant, how those tokens were found: the chat template's {% generation %} blocks "
        "(what TRL's assistant-only loss trains), or, where the template has none, each assistant turn from the "
        "generation prompt through its closing tokens; null when every token is scored.",
    )
    windows: int = Field(description="Number of windows.")
    tokens: int = Field(description="Scored tokens per model.")
    compute_dtype: str = Field(description="dtype the merged and GPTQ models were scored in.")
    text: str = Field(description="The evaluation data: the file's name or the hub dataset's id.")
    documents: int = Field(description="Documents in the evaluation text.")
    bootstrap_samples: int = Field(description="Resamples of the paired bootstrap over windows.")
    seed: int = Field(description="Seed of the bootstrap.")


class ModelScores(_Compared):
    """One model's scores against the baseline (the NF4 base with the adapter unmerged, as trained)."""

    interval_field: ClassVar[str] = "delta_pct_ci95"

    ppl: float = Field(description="Perplexity over the scored tokens.")
    tokens: int = Field(description="Scored tokens.")
    windows: int = Field(description="Scored windows.")
    delta_ppl: float = Field(description="PPL minus the baseline's PPL.")
    delta_pct: float = Field(description="PPL change against the baseline, percent.")
    delta_pct_ci95: tuple[float, float] | None = _interval(
        "Paired bootstrap 95% interval of delta_pct over windows, [low, high]; on every row but the baseline's. Null "
        "where none could be computed: fewer than 2 windows, or a degenerate bootstrap (not finite, or not containing "
        "delta_pct)."
    )
    kl: float | SkipJsonSchema[None] = _omitted(
        "Mean token KL(baseline || model), nats; on every row but the baseline's."
    )
    top1_agreement: float | SkipJsonSchema[None] = _omitted(
        "Share of scored tokens where model and baseline predict the same next token; on every row but the baseline's."
    )
    placement: dict[str, int] | SkipJsonSchema[None] = _omitted(
        "Where the model ran: device (cpu, cuda:0, disk, ...) -> modules accelerate placed there; one module "
        "for the whole model on a single device."
    )


class GateCheck(_Closed):
    """One configured gate, judged on the release model (GPTQ)."""

    name: GateName = Field(description="The gate's config key under gate.")
    value: float | None = Field(
        description="The measured value; for the PPL gate the upper bound of the 95% interval, for a task drop the "
        "largest drop it allows. Null when the interval a gate is judged on could not be computed: the check fails."
    )
    limit: float = Field(description="The configured limit.")
    passed: bool = Field(description="Whether the value is within the limit.")
    message: str = Field(description="The verdict in words.")


class Gate(_Closed):
    """The release gate: every configured check on GPTQ against the baseline."""

    enabled: bool = Field(description="Whether any gate is configured.")
    passed: bool = Field(description="Whether no check failed (true when none is configured).")
    checks: list[GateCheck] = Field(description="Every configured check.")
    failed: list[GateName] = Field(description="Names of the failed checks.")
    message: str = Field(description="The failed checks in words, else every check's, else that none is configured.")


class Requantize(_Closed):
    """The GPTQ settings a GPTQ model was quantized with, and the check of its checkpoint."""

    variant: str = Field(description="The variant's name (requantize.variants); empty without variants.")
    bits: int = Field(description="Bits per weight.")
    group_size: int = Field(description="Weights per quantization group; -1: one group per output channel.")
    desc_act: bool = Field(description="Whether columns were quantized in order of decreasing activation.")
    sym: bool = Field(description="Whether quantization is symmetric.")
    damp_percent: float = Field(description="Hessian dampening, as a fraction of its mean diagonal.")
    gptaq: bool = Field(description="Whether GPTAQ (gptqmodel's asymmetric calibration) was used.")
    mse: float = Field(description="Exponent of the scale grid search's error (0: no search).")
    act_group_aware: bool | None = Field(description="Activation-group-aware ordering; null: gptqmodel's default.")
    static_groups: bool = Field(description="Whether groups were fixed before quantization.")
    dtype: str = Field(
        default="",
        description="The dtype of the checkpoint's unquantized tensors and config.json (the merged model's unless "
        "requantize.dtype says otherwise); empty in runs made before it was recorded.",
    )
    compute_dtype: str = Field(default="", description="The dtype GPTQ ran in (exact for the merged weights).")
    calibration_windows: int = Field(description="Calibration samples.")
    calibration_seq_len: int = Field(description="Tokens per calibration sample (at most, for conversations).")
    calibration_format: Literal["text", "chat"] = Field(
        description="text: windows of the joined text; chat: one conversation per sample, rendered with the "
        "chat template."
    )
    fused_layers: int = Field(
        description="GPTQ tensors that gptqmodel saved split (e.g. Phi-3's gate_up_proj as gate_proj and up_proj) "
        "and qlora-requant joined back into the fused layers transformers and the runtimes expect."
    )
    kernel: str = Field(
        description="The gptqmodel kernel plain transformers ran the checkpoint with, e.g. TorchAtenLinear."
    )
    backend: str = Field(
        description="auto when the kernel transformers picks ran the checkpoint; else the gptqmodel backend that did "
        "(the evaluation loads the checkpoint with it)."
    )
    check_relative_error: float = Field(
        description="||logits - merged logits|| / ||merged logits - mean|| on one calibration window, in a fresh "
        "process: the check that the checkpoint loads and runs like the merged model."
    )
    model_type: str | None = Field(None, description="The model's model_type (config.json).")
    loader: Literal["transformers", "gptqmodel"] = Field(
        "transformers",
        description="What loaded it for the check and the evaluation: transformers' from_pretrained, or (a "
        "mixture-of-experts model, its experts quantized one by one) gptqmodel's GPTQModel.load.",
    )


class Variant(_Closed):
    """One GPTQ variant: its settings, size, quality against the baseline, gates and where it serves."""

    name: str = Field(description="The variant's name; gptq without variants.")
    model: str = Field(description="Its row in models.")
    path: str = Field(description="Its checkpoint folder, relative to the run directory.")
    bits: int = Field(description="Bits per weight.")
    group_size: int = Field(description="Weights per quantization group; -1: one group per output channel.")
    desc_act: bool = Field(description="Act-order.")
    sym: bool = Field(description="Symmetric quantization.")
    gptaq: bool = Field(description="GPTAQ.")
    mse: float = Field(description="Scale grid search exponent (0: none).")
    size_bytes: int = Field(description="Bytes of its safetensors files.")
    ppl: float = Field(description="Perplexity.")
    delta_pct: float = Field(description="PPL change against the baseline, percent.")
    delta_pct_ci95: tuple[float, float] | None = Field(
        description="Paired bootstrap 95% interval of delta_pct; null where none could be computed (see models)."
    )
    kl: float = Field(description="Mean token KL(baseline || variant), nats.")
    top1_agreement: float = Field(description="Top-1 agreement with the baseline.")
    gates_passed: bool = Field(description="Whether every configured gate passes (true when none is).")
    gate: Gate = Field(description="The gates judged on this variant.")
    serves_on: dict[str, str] = Field(
        description="Runtimes that load this checkpoint, with the kernel each serves it with (from their documented "
        "constraints; see quant/serving.py); a runtime that cannot is absent."
    )
    loader: Literal["transformers", "gptqmodel"] = Field(
        "transformers",
        description="How transformers loads it: from_pretrained, or (a mixture-of-experts model, its experts "
        "quantized one by one) only gptqmodel's GPTQModel.load.",
    )


class GptqLoss(_Closed):
    """gptqmodel's GPTQ loss of one module."""

    layer: int = Field(description="Decoder layer index.")
    module: str = Field(description="Module within the layer, e.g. self_attn.q_proj.")
    loss: float = Field(description="GPTQ loss, as gptqmodel's quant_log.csv reports it.")


class LossSources(_Closed):
    """Where the loss comes from: re-quantization, the NF4 round trip of the base, the merge."""

    gptq_error: list[GptqLoss] = Field(
        description="Per module, by layer and module name; empty when gptqmodel wrote no quant_log.csv."
    )
    gptq_variant: str = Field(
        default="",
        description="The GPTQ model gptq_error is of: the release candidate, or the first variant when none passes.",
    )
    gptq_note: str = Field(
        default="", description="Why gptq_error is empty, or how to read it (GPTAQ's loss is on a scale of its own)."
    )
    nf4_roundtrip_error: dict[str, float] = Field(
        description="Per base weight, ||W_nf4 - W|| / ||W|| of the NF4 round trip; empty when the merge went into "
        "the original weights or the base is a 4-bit checkpoint."
    )
    merge_relative_change: dict[str, float] = Field(
        description="Per merged weight, ||W_merged - W|| / ||W||, largest first."
    )


class TaskModelScore(_Compared):
    """One model's score on a task, and (but for the baseline) its change against the baseline."""

    interval_field: ClassVar[str] = "delta_ci95"

    value: float = Field(description="The task's metric, as lm-eval reports it (acc: a share of samples).")
    delta: float | SkipJsonSchema[None] = _omitted("Change against the baseline, in points (x100).")
    delta_ci95: tuple[float, float] | None = _interval(
        "Paired bootstrap 95% interval of delta over samples (the evaluation's bootstrap_samples and seed); absent on "
        "the baseline's row, null where none could be computed (fewer than 2 samples, or a degenerate bootstrap)."
    )
    mcnemar_p: float | SkipJsonSchema[None] = _omitted(
        "McNemar's exact two-sided p for the paired right/wrong outcomes; absent for metrics that are not 0/1."
    )


class TaskScores(_Closed):
    """An lm-evaluation-harness task scored for every model on the same samples."""

    metric: str = Field(description="The metric lm-eval reports first for the task (acc, acc_norm, exact_match, ...).")
    samples: int = Field(description="Samples scored, the same for every model.")
    models: dict[str, TaskModelScore] = Field(description="Per model: baseline, merged (unless skipped), GPTQ.")


class Generations(_Closed):
    """Greedy continuations of the configured prompts, side by side."""

    prompts: list[str] = Field(description="The configured prompts.")
    max_new_tokens: int = Field(description="New tokens generated per prompt.")
    outputs: dict[str, list[str]] = Field(description="Per model (not base_nf4), one continuation per prompt.")


class StageRecord(BaseModel):
    """One completed stage: when it finished, its time and memory, then the keys of the stage's own summary."""

    model_config = ConfigDict(extra="allow")

    finished: float = Field(description="When the stage finished, seconds since the Unix epoch.")
    rss_start_mb: float | SkipJsonSchema[None] = _omitted("Resident memory when the stage began, MB (Linux only).")
    seconds: float = Field(description="Wall time, seconds.")
    peak_rss_mb: float = Field(description="Peak resident memory during the stage, MB.")
    peak_gpu_mb: float | SkipJsonSchema[None] = _omitted("Peak CUDA memory allocated, MB (CUDA only).")


class Report(_Closed):
    """report.json: the quality of the merged and GPTQ models against the model as trained, and how the run went."""

    schema_version: Literal[4] = Field(description="Version of this schema; raised when a change breaks readers.")
    created: str = Field(
        description="When the report was built, ISO 8601 in UTC.", json_schema_extra={"format": "date-time"}
    )
    device: str = Field(
        description="Device the run's stages computed on, e.g. cpu or cuda; several, in stage order and "
        "comma-separated, when its stages ran as jobs on different machines (cpu, cuda)."
    )
    protocol: Protocol
    models: dict[str, ModelScores] = Field(
        description="Per model, in the order scored: base_nf4 (NF4 base alone), baseline (the model as trained), "
        "merged, gptq (gptq_<variant> per GPTQ variant), and merged_<base> and gptq_<base> when both merge bases "
        "are compared."
    )
    adapter_ppl_change_pct: float = Field(
        description="PPL change the adapter makes: baseline against base_nf4, percent."
    )
    gate: Gate = Field(
        description="The gates judged on the release model: the release candidate, else the variant that came closest "
        "to passing (closest_variant)."
    )
    variants: list[Variant] = Field(
        description="Every GPTQ model of the chosen merge base, in config order (one, named gptq, without variants)."
    )
    release_candidate: str | None = Field(
        description="The smallest variant on disk that passes every gate (of equal sizes, the one of lowest KL); null "
        "when none passes."
    )
    license: str | None = Field(
        default=None,
        description="The license the model cards declare: release.license, else the base's own model card's; null "
        "when neither names one.",
    )
    closest_variant: str | None = Field(
        default=None,
        description="When no variant passes: the one that came closest (fewest failed gates, then the smallest "
        "shortfall relative to each limit), which `gate`, `requantize` and the headline are about; else null.",
    )
    merge_base: Literal["nf4", "original"] = Field(
        description="What the adapter was merged into: the dequantized NF4 weights or the original 16-bit ones."
    )
    requantize: Requantize = Field(description="The release model's GPTQ settings and checkpoint check.")
    loss_sources: LossSources
    generations: Generations
    tasks: dict[str, TaskScores] = Field(
        default_factory=dict, description="Per lm-evaluation-harness task (evaluation.tasks); empty when none."
    )
    artifacts: dict[str, str] = Field(
        description="Checkpoint folders the run wrote, by name (merged, gptq, ..., dequantized)."
    )
    stages: dict[str, StageRecord] = Field(description="Per completed stage, in run order.")
    output_sha256: dict[str, dict[str, str]] = Field(
        description="Per stage, the SHA-256 of each output file, by path relative to the run directory."
    )
    versions: dict[str, str] = Field(
        description="Versions of qlora-requant, the libraries it ran with (torch, transformers, peft, bitsandbytes, "
        "gptqmodel, safetensors, datasets, accelerate, optimum, lm-eval) and Python."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the input checks found worth a look without refusing the run (e.g. an adapter that names "
        "another base, evaluation text overlapping calibration).",
    )
    config: dict[str, Any] = Field(description="The resolved run config (see pipeline/config.py, RunConfig).")
    _run_dir: Path | None = PrivateAttr(default=None)

    @property
    def run_dir(self) -> Path | None:
        """The run directory the report was written to or read from (not in report.json, which names no local
        path); None for a report built elsewhere."""
        return self._run_dir

    def located(self, run_dir: Path) -> Report:
        """This report, knowing its run directory."""
        self._run_dir = run_dir
        return self

    @model_validator(mode="after")
    def _rows_compared_with_the_baseline(self) -> Report:
        if BASELINE not in self.models:
            raise ValueError(f"models: no {BASELINE} row")
        for name, row in self.models.items():
            compared = "delta_pct_ci95" in row.model_fields_set and None not in (row.kl, row.top1_agreement)
            if name != BASELINE and not compared:
                raise ValueError(
                    f"models.{name}: delta_pct_ci95, kl and top1_agreement are required on every row but the baseline's"
                )
        return self

    def to_json(self) -> str:
        """The text of report.json."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def report_json_schema() -> dict:
    """The JSON Schema of report.json (report.schema.json): its dialect and identifier, then the Report's."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:qlora-requant:report-schema:{SCHEMA_VERSION}",
        **Report.model_json_schema(),
    }


if __name__ == "__main__":
    print(json.dumps(report_json_schema(), indent=2))
