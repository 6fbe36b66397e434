"""Stage 5, report: the quality-loss report, built only from what earlier stages saved in the run directory.

Reads run.json (resolved config, device, library versions), stages/<name>.json (each stage's summary,
time and memory), the reference's and every scoring stage's scores.json under evaluation/ (per-window scores,
generations, tasks) and gptqmodel's quant_log.csv in the GPTQ folder. Nothing is used unverified: every stage
record carries a checksum, the scores and quant_log.csv must have the SHA-256 their stage recorded, and every
file of the run a stage read must be the one its producing stage recorded (no stage re-ran since). Writes report.json,
report.md, report.html and the GPTQ folder's README.md (model card), after deleting the previous ones.
report.json is the dump of a validated `Report` (eval/schema.py), which every other file is rendered
from. `qlora-requant report RUN_DIR` runs this alone, without loading a model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from qlora_requant.eval.compare import change, closest_to_passing, compare_tasks, compare_to_baseline, judge_gates
from qlora_requant.eval.model_card import base_card_license, render_model_card
from qlora_requant.eval.report import render_reports
from qlora_requant.eval.schema import SCHEMA_VERSION, GptqLoss, Report
from qlora_requant.eval.scoring import joined
from qlora_requant.pipeline.files import fsync_path, write_atomically
from qlora_requant.pipeline.layout import GPTQ_LOSS_LOG, MODEL_CARD, REFERENCE_PROTOCOL, REPORT_FILES, SCORES, RunLayout
from qlora_requant.pipeline.plan import gptq_model, requantize_stage_name
from qlora_requant.pipeline.public import public_config, public_text
from qlora_requant.pipeline.records import RecordError, read_record
from qlora_requant.pipeline.tokenizer import has_chat_template
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.serving import serving_runtimes


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{path}: missing, so {what} is not there; run `qlora-requant run` on this run's config first"
        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from None


def _rerun_hint(stage: str) -> str:
    return f"re-run that stage: qlora-requant run CONFIG --force {stage}"


def stage_records(layout: RunLayout, planned: list[str]) -> dict[str, dict]:
    """Each completed stage's record, in the order the run planned them (merge before merge_original),
    each checked against its checksum and against the records of the stages whose outputs it read."""
    records = {}
    for name in planned:
        path = layout.stage_record(name)
        if path.is_file():
            try:
                records[name] = read_record(path)
            except RecordError as exc:
                raise InputError(f"{exc}; {_rerun_hint(name)}") from None
    written = {
        file: (name, entry["sha256"]) for name, record in records.items() for file, entry in record["outputs"].items()
    }
    for name, record in records.items():
        for file, entry in record["input_files"].items():
            producer, sha = written.get(file, (None, entry["sha256"]))
            if sha != entry["sha256"]:
                raise InputError(
                    f"{layout.root}: the {name} stage read {file} as it was before the {producer} stage "
                    "re-ran; run `qlora-requant run` with the run's config to bring it up to date"
                )
    return records


def verified_bytes(layout: RunLayout, record: dict, path: Path) -> bytes:
    """A file a stage wrote, if it still has the SHA-256 the stage recorded."""
    name = layout.relative(path)
    recorded = record["outputs"].get(name, {}).get("sha256")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); {_rerun_hint(record['stage'])}") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise InputError(
            f"{path}: not the file the {record['stage']} stage wrote (its SHA-256 differs from the one in "
            f"{layout.stage_record(record['stage']).name}); {_rerun_hint(record['stage'])}"
        )
    return data


def gptq_losses(layout: RunLayout, requantize: dict, model: str) -> list[GptqLoss]:
    """gptqmodel's per-module GPTQ loss (quant_log.csv) of a GPTQ model, or nothing if it wrote none."""
    path = layout.model_dir(model) / GPTQ_LOSS_LOG
    if layout.relative(path) not in requantize["outputs"]:
        return []
    rows = csv.DictReader(io.StringIO(verified_bytes(layout, requantize, path).decode()))
    losses = [GptqLoss(layer=int(row["layer"]), module=row["module"], loss=float(row["loss"])) for row in rows]
    return sorted(losses, key=lambda loss: (loss.layer, loss.module))  # gptqmodel logs a layer's modules as they end


def _gptq_loss_note(layout: RunLayout, requantize: dict, variant: dict) -> str:
    """What a reader of the release's per-module GPTQ loss needs told: that there is none, and why; or that GPTAQ's
    is on a scale of its own."""
    if layout.relative(layout.model_dir(variant["model"]) / GPTQ_LOSS_LOG) not in requantize["outputs"]:
        return (
            f"gptqmodel wrote no per-module loss (quant_log.csv) for {variant['model']}; to have one, re-run its "
            f"stage: qlora-requant run CONFIG --force {requantize['stage']}"
        )
    if variant["gptaq"]:
        return (
            "GPTAQ's per-module loss, as gptqmodel reports it, is on a scale of its own, far above GPTQ's: compare it "
            "only with other GPTAQ variants'."
        )
    return ""


def build_report(layout: RunLayout) -> tuple[Report, dict]:
    """The report of a run directory, validated, and the evaluation results it was computed from."""
    run_dir = layout.root
    run = read_json(layout.run_record, "the run's record")
    stages = stage_records(layout, run.get("stages", []))
    unfinished = [name for name in run.get("stages", []) if name not in stages]
    if unfinished:
        raise InputError(
            f"{run_dir}: the {unfinished[0]} stage has no completed record (the run was "
            "interrupted or failed); run `qlora-requant run` with the run's config to finish it"
        )
    try:
        results = evaluation_results(layout, stages)
        return _assemble(layout, run, results, stages), results
    except (KeyError, TypeError, ValidationError) as exc:
        raise InputError(
            f"{run_dir}: its records do not hold what this version of qlora-requant reports "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); they were written by another "
            "version or edited: re-run `qlora-requant run` with the run's config"
        ) from None


def evaluation_results(layout: RunLayout, stages: dict[str, dict]) -> dict:
    """Every model's scores as one: the reference's protocol and prompts, then per model (base_nf4, baseline,
    then each scoring stage's, in plan order) its per-window scores, continuations and task scores."""
    reference = stages["reference"]
    protocol = _verified_json(layout, reference, layout.reference / REFERENCE_PROTOCOL)
    parts = [_verified_json(layout, reference, layout.reference / SCORES)]
    for record in stages.values():
        if record["kind"] == "score":
            parts.append(_verified_json(layout, record, layout.scores(record["summary"]["model"]) / SCORES))
    scores = joined(*parts)
    models = {"base_nf4": scores["models"].pop("base_nf4"), **scores["models"]}  # display order: base_nf4 first
    generations = {"prompts": protocol["prompts"], "max_new_tokens": protocol["max_new_tokens"]}
    return {
        "protocol": protocol["protocol"],
        "models": models,
        "generations": {**generations, "outputs": scores["generations"]},
        "tasks": scores["tasks"],
    }


def _verified_json(layout: RunLayout, record: dict, path: Path) -> dict:
    try:
        return json.loads(verified_bytes(layout, record, path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {_rerun_hint(record['stage'])}") from None


def variant_models(config: dict) -> dict[str, str]:
    """The GPTQ models of the chosen merge base by variant name (one, gptq, without variants)."""
    names = [variant["name"] for variant in config["requantize"].get("variants", [])]
    return {name: gptq_model(name) for name in names} if names else {"gptq": gptq_model("")}


def _variants(layout: RunLayout, config: dict, compared: dict, tasks: dict, stages: dict[str, dict]) -> list[dict]:
    """Each scored GPTQ variant's settings, size on disk, scores, gates and runtimes, in config order."""
    variants = []
    for name, model in variant_models(config).items():
        if model not in compared:  # left out by evaluation.models
            continue
        record = stages[requantize_stage_name(model)]
        settings, row = record["summary"], compared[model]
        gate = judge_gates(compared, config["gate"], model, tasks)
        format_settings = {key: settings[key] for key in ("bits", "group_size", "desc_act", "sym")}
        loader = settings.get("loader", "transformers")
        variants.append(
            {
                "name": name,
                "model": model,
                "path": layout.relative(layout.model_dir(model)),
                **format_settings,
                "gptaq": settings["gptaq"],
                "mse": settings["mse"],
                "size_bytes": sum(
                    entry["size"] for path, entry in record["outputs"].items() if path.endswith(".safetensors")
                ),
                **{key: row[key] for key in ("ppl", "delta_pct", "delta_pct_ci95", "kl", "top1_agreement")},
                "gates_passed": gate["passed"],
                "gate": gate,
                "serves_on": serving_runtimes(**format_settings, model_type=settings.get("model_type"), loader=loader),
                "loader": loader,
            }
        )
    return variants


def _assemble(layout: RunLayout, run: dict, results: dict, stages: dict[str, dict]) -> Report:
    """The report from the run record, the evaluation's results and the stage records."""
    config, evaluation = run["config"], run["config"]["evaluation"]
    compared = compare_to_baseline(results["models"], evaluation["bootstrap_samples"], evaluation["seed"])
    merge = stages["merge"]["summary"]
    tasks = compare_tasks(results.get("tasks", {}), evaluation["bootstrap_samples"], evaluation["seed"])
    variants = _variants(layout, config, compared, tasks, stages)
    passing = [variant for variant in variants if variant["gates_passed"]]
    # the smallest on disk; of equal sizes, the one closest to the baseline
    candidate = min(passing, key=lambda variant: (variant["size_bytes"], variant["kl"])) if passing else None
    closest = None if candidate else closest_to_passing({variant["name"]: variant["gate"] for variant in variants})
    release = candidate or next(variant for variant in variants if variant["name"] == closest)
    requantize = stages[requantize_stage_name(release["model"])]
    artifacts = {name: name for name in results["models"] if layout.model_dir(name).is_dir()}
    if "dequantize" in stages:
        artifacts["dequantized"] = layout.relative(layout.dequantized)
    return Report.model_validate(
        {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": ", ".join(dict.fromkeys(record["manifest"]["settings"]["device"] for record in stages.values())),
            "protocol": {
                **results["protocol"],
                "bootstrap_samples": evaluation["bootstrap_samples"],
                "seed": evaluation["seed"],
            },
            "models": compared,
            "adapter_ppl_change_pct": change(compared["baseline"]["ppl"], compared["base_nf4"]["ppl"])["pct"],
            "gate": release["gate"],
            "variants": variants,
            "release_candidate": candidate["name"] if candidate else None,
            "closest_variant": closest,
            "license": config.get("release", {}).get("license") or base_card_license(Path(config["base"]["path"])),
            "merge_base": config["merge"]["merge_base"],
            "requantize": {key: value for key, value in requantize["summary"].items() if key != "process"},
            "loss_sources": {
                "gptq_error": gptq_losses(layout, requantize, release["model"]),
                "gptq_variant": release["model"],
                "gptq_note": _gptq_loss_note(layout, requantize, release),
                "nf4_roundtrip_error": merge.get("base", {}).get("roundtrip_error", {}),
                "merge_relative_change": merge["relative_change"],
            },
            "generations": results["generations"],
            "tasks": tasks,
            "artifacts": artifacts,
            "stages": {
                name: {"finished": record["finished"], **record["measures"], **record["summary"]}
                for name, record in stages.items()
            },
            "output_sha256": {
                name: {path: entry["sha256"] for path, entry in record["outputs"].items()}
                for name, record in stages.items()
            },
            "versions": run["versions"],
            "warnings": [public_text(warning, config) for warning in run.get("warnings", [])],
            "config": public_config(config),
        }
    )


def write_reports(layout: RunLayout) -> Report:
    """Build the report from the run directory and write every report file and each GPTQ model's card.

    The previous ones are deleted first and the new ones written only once all are rendered: whatever fails on the
    way, no report of earlier results is left beside the run's current ones (`qlora-requant report` rebuilds it).
    """
    remove_reports(layout)
    report, results = build_report(layout)
    files = dict(zip((layout.report_file(name) for name in REPORT_FILES), render_reports(report, results)))
    for variant in report.variants:
        folder = layout.model_dir(variant.model)
        files[folder / MODEL_CARD] = render_model_card(report, variant, chat=has_chat_template(folder))
    for path, text in files.items():
        write_atomically(path, text)
    return report.located(layout.root)


def remove_reports(layout: RunLayout) -> None:
    """Delete the run's report files and the model cards in its GPTQ folders (all files the report wrote)."""
    cards = layout.root.glob(f"{gptq_model('')}*/{MODEL_CARD}")
    for path in [*(layout.report_file(name) for name in REPORT_FILES), *cards]:
        path.unlink(missing_ok=True)
    fsync_path(layout.root)
