"""Stage 3, requantize: GPTQ on calibration samples of the fine-tuning domain (text windows, or chat records
rendered with the fine-tune's chat template), once per variant of the GPTQ settings.

Input: the merged checkpoint and calibration data. Output: a GPTQ checkpoint that plain
transformers loads, with quantization_config in config.json and no calibration text in it. Before the
stage counts as complete, the checkpoint is loaded in a fresh process as the evaluation loads it and its
logits on a calibration window are compared with the merged model's; when the kernel transformers picks
does not run it, another is tried, and the one that works is named in the summary.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from qlora_requant.pipeline.checkpoint import (
    INDEX,
    CheckpointReader,
    TensorSource,
    read_model_config,
    rewrite_checkpoint,
    side_files,
)
from qlora_requant.pipeline.config import CalibrationSection, GptqSection
from qlora_requant.pipeline.console import console
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.isolated import Reporter, run_isolated
from qlora_requant.pipeline.model_checks import gptq_loader
from qlora_requant.pipeline.tokenizer import GENERATION_CONFIG, copy_tokenizer
from qlora_requant.quant.calibration import calibration_samples
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.gptq import (
    CPU_BACKENDS,
    GptqSettings,
    check_checkpoint,
    fuse_split_layers,
    gptq_dtypes,
    gptq_quantize,
    join_tensors,
    uses_model_names,
)

log = logging.getLogger(__name__)


def run(
    context: StageContext,
    out: Path,
    *,
    gptq: GptqSection,
    calibration: CalibrationSection,
    merged: str,
    variant: str = "",
) -> dict:
    """Quantize the merged model named `merged` with GPTQ settings `gptq` (those of `variant`, if any) into
    `out`; return a summary for the report."""
    from transformers import AutoTokenizer

    section = gptq
    merged_dir = context.layout.model_dir(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=context.trust_remote_code)
    windows = calibration_samples(
        tokenizer, context.inputs.calibration, calibration.n_samples, calibration.seq_len, calibration.seed
    )
    what = f"requantize{'_' + variant if variant else ''}"
    merged_config = read_model_config(merged_dir)
    reader = CheckpointReader(merged_dir)
    stored = next(reader.dtype(key) for key in reader.keys() if reader.dtype(key).is_floating_point)
    compute, release = gptq_dtypes(stored, context.device, gptq.dtype)
    spec = {
        "what": f"the {what} stage",
        "progress": what,
        "out": out,
        "model_dir": merged_dir,
        "calibration": windows,
        "settings": GptqSettings(**gptq.model_dump(exclude={"rotation", "dtype"})),
        "device": context.device,
        "log_dir": context.layout.gptq_logs,
        "dtypes": (compute, release),
        "trust_remote_code": context.trust_remote_code,
        "offload_to_disk": uses_model_names(merged_config, reader.keys()),
    }
    quantized = run_isolated(quantize, spec, context.layout.log)
    for name in ("config.json", "quantize_config.json"):
        _drop_run_specific_keys(out / name)
    copy_tokenizer(merged_dir, out)  # byte for byte: gptqmodel re-saves the tokenizer in its own way
    shutil.copy2(merged_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
    fused = _fuse_split_layers(out, merged_dir)
    console.info("%s: checking that the GPTQ checkpoint loads and runs like the merged model", what)
    loader = gptq_loader(merged_config)
    first = windows[0]["input_ids"][0].tolist()
    check = _check_runs(out, merged_dir, first, context.device, section.bits, loader, context.layout.log)
    _keep_newest_logs(context.layout.gptq_logs)
    log.info(
        "requantize: GPTQ %d-bit g%d on %d samples of up to %d tokens",
        section.bits,
        section.group_size,
        len(windows),
        calibration.seq_len,
    )
    return {
        "variant": variant,
        **section.model_dump(exclude={"rotation", "batch_size", "dtype"}),
        "dtype": str(release).removeprefix("torch."),
        "compute_dtype": str(compute).removeprefix("torch."),
        "calibration_windows": len(windows),
        "calibration_seq_len": calibration.seq_len,
        "calibration_format": "chat" if context.inputs.calibration.chat else "text",
        "fused_layers": fused,
        "process": quantized["process"],
        "model_type": merged_config.get("model_type"),
        "loader": loader,
        **check,
    }


def quantize(spec: dict, reporter: Reporter) -> dict:
    """In the stage's own process (gptqmodel's loader may patch transformers' model classes for the process):
    GPTQ of the merged model, its progress shown layer by layer."""
    total = [0]

    def reached(layer: int, layers: int) -> None:
        total[0] = layers
        reporter.progress(spec["progress"], layer - 1, layers, "layers")

    gptq_quantize(
        spec["model_dir"],
        spec["calibration"],
        spec["settings"],
        spec["device"],
        spec["out"],
        log_dir=spec["log_dir"],
        dtypes=spec["dtypes"],
        trust_remote_code=spec["trust_remote_code"],
        offload_to_disk=spec["offload_to_disk"],
        on_layer=reached,
    )
    reporter.progress(spec["progress"], total[0], total[0], "layers")
    return {}


# Largest relative logit error ||GPTQ - merged|| / ||merged - mean|| on a calibration window for a checkpoint
# that runs correctly. Far above what GPTQ costs (0.1-0.25 at 4 bits on tiny random models, less on trained
# ones), far below what missing or misread weights give (about 1.4: unrelated logits).
LOGIT_ERROR_LIMIT = {2: 1.0, 3: 0.7, 4: 0.5, 8: 0.3}
KEPT_GPTQ_LOGS = 5


def _fuse_split_layers(out: Path, merged_dir: Path) -> int:
    """Join layers gptqmodel saved split (see quant.gptq.SPLIT_ON_SAVE) back into the merged model's fused
    layers; returns how many tensors were joined."""
    merged_modules = {key.removesuffix(".weight") for key in CheckpointReader(merged_dir).keys()}
    reader = CheckpointReader(out)
    joins = fuse_split_layers(reader, merged_modules)
    if not joins:
        return 0
    first_parts = {parts[0]: fused for fused, parts in joins.items()}
    part_modules = {name.rsplit(".", 1)[0] for parts in joins.values() for name in parts}
    consumed = {key for key in reader.keys() if key.rsplit(".", 1)[0] in part_modules}

    def transform(key: str, source: TensorSource) -> dict:
        if key in first_parts:
            fused = first_parts[key]
            return {fused: join_tensors(fused, [source.get(part) for part in joins[fused]])}
        return {} if key in consumed else {key: source.get(key)}

    rewritten = out / ".fused"
    rewritten.mkdir()
    rewrite_checkpoint(reader, rewritten, transform, what="fuse")
    for old in reader.shards + [out / INDEX]:
        old.unlink(missing_ok=True)
    for new in rewritten.iterdir():
        new.rename(out / new.name)
    rewritten.rmdir()
    log.info("requantize: joined %d tensors of split layers back into fused layers", len(joins))
    return len(joins)


def _check_runs(
    out: Path, merged_dir: Path, input_ids: list[int], device: str, bits: int, loader: str, log_file: Path
) -> dict:
    """Refuse to complete with a checkpoint that does not load (by `loader`) and run like the merged model; returns
    the kernel, the gptqmodel backend (auto: the one the loader picks) and the logit error."""
    limit = LOGIT_ERROR_LIMIT[bits]
    tried = []
    backends = CPU_BACKENDS if device == "cpu" and loader == "transformers" else ()
    for backend in ("", *backends):
        result = probe(out, merged_dir, input_ids, device, backend, loader, log_file)
        if result.get("finite") and result["relative_error"] <= limit:
            if backend:
                log.warning(
                    "requantize: the default GPTQ kernel did not run this checkpoint (%s); using %s",
                    "; ".join(tried),
                    backend,
                )
            return {
                "kernel": result["kernel"],
                "backend": backend or "auto",
                "check_relative_error": round(result["relative_error"], 6),
            }
        tried.append(f"{backend or 'default'}: {_describe(result, limit)}")
    architecture = json.loads((merged_dir / "config.json").read_text()).get("architectures", ["?"])[0]
    how = "plain transformers" if loader == "transformers" else "gptqmodel's loader"
    raise InputError(
        f"{out}: the GPTQ checkpoint of this {architecture} model does not run in {how} on {device} "
        f"with any gptqmodel kernel ({'; '.join(tried)}); this architecture cannot be released as GPTQ with "
        "these versions: try other requantize settings or report it"
    )


def probe(
    gptq_dir: Path, merged_dir: Path, input_ids: list[int], device: str, backend: str, loader: str, log_file: Path
) -> dict:
    """quant.gptq.check_checkpoint in a process of its own; {failed: [why]} when that process failed or crashed."""
    spec = {
        "what": f"the check of {gptq_dir.name}",
        "out": gptq_dir,
        "gptq_dir": gptq_dir,
        "merged_dir": merged_dir,
        "input_ids": input_ids,
        "device": device,
        "backend": backend,
        "loader": loader,
    }
    try:
        return run_isolated(check_checkpoint, spec, log_file)
    except RuntimeError as exc:
        return {"failed": [str(exc).split(" failed: ", 1)[-1]]}


def _describe(result: dict, limit: float) -> str:
    if "missing" in result:
        return f"{len(result['missing'])} weights not loaded, e.g. {result['missing'][0]}"
    if "failed" in result:
        return f"failed: {result['failed'][0]}"
    if not result["finite"]:
        return f"{result['kernel']} gives NaN or Inf logits"
    return f"{result['kernel']} logits off by {result['relative_error']:.2f} (limit {limit})"


def _keep_newest_logs(log_dir: Path) -> None:
    """gptqmodel writes one log per GPTQ run (gptq_log_*.log, gptaq_log_*.log); keep the newest few. Another job's
    GPTQ may prune at the same time: a log gone meanwhile is skipped."""
    times = {}
    for path in log_dir.glob("gpt*_log_*.log"):
        try:
            times[path] = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    for old in sorted(times, key=times.get)[:-KEPT_GPTQ_LOGS]:
        old.unlink(missing_ok=True)


def estimate_gptq_bytes(merged_dir: Path, bits: int) -> int:
    """About how many bytes the GPTQ checkpoint of `merged_dir` takes: decoder-layer matrices at
    `bits` per weight plus ~10% for scales and zero points, every other tensor as stored, the tokenizer
    and configuration files, and 1 MB for gptqmodel's log."""
    reader = CheckpointReader(merged_dir)
    total = sum(path.stat().st_size for path in side_files(merged_dir)) + 2**20
    for key in reader.keys():
        shape, itemsize = reader.shape(key), reader.dtype(key).itemsize
        quantized = ".layers." in key and key.endswith(".weight") and len(shape) == 2
        total += int(shape.numel() * bits / 8 * 1.1) if quantized else shape.numel() * itemsize
    return total


def _drop_run_specific_keys(config_path: Path) -> None:
    """Never ship the calibration text (some GPTQ writers store it in quantization_config.dataset), nor
    gptqmodel's temporary offload folder, which differs between runs of the same config."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    quantization = config.get("quantization_config", config)
    quantization.pop("dataset", None)
    quantization.get("meta", {}).pop("offload_to_disk_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
