"""Stage 3, requantize: GPTQ on calibration windows of the fine-tuning domain.

Input: the merged checkpoint and calibration texts. Output: a GPTQ checkpoint that plain
transformers loads, with quantization_config in config.json and no calibration text in it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_requant.pipeline.checkpoint import CheckpointReader
from qlora_requant.pipeline.config import RequantizeSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.quant.calibration import calibration_windows, token_stream
from qlora_requant.quant.gptq import GptqSettings, gptq_quantize

log = logging.getLogger(__name__)


def run(context: StageContext, out: Path, *, requantize: RequantizeSection, merged: str) -> dict:
    """Quantize the merged model named `merged` with GPTQ into `out`; return a summary for the report."""
    from transformers import AutoTokenizer

    section, calibration = requantize, requantize.calibration
    merged_dir = context.layout.model_dir(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=context.trust_remote_code)
    windows = calibration_windows(
        token_stream(tokenizer, context.inputs.calibration_texts),
        calibration.n_samples,
        calibration.seq_len,
        calibration.seed,
        where=calibration.describe(),
    )
    settings = GptqSettings(
        bits=section.bits,
        group_size=section.group_size,
        desc_act=section.desc_act,
        sym=section.sym,
        damp_percent=section.damp_percent,
        batch_size=section.batch_size,
    )
    gptq_quantize(
        merged_dir,
        windows,
        settings,
        context.device,
        out,
        log_dir=context.layout.gptq_logs,
        trust_remote_code=context.trust_remote_code,
    )
    for name in ("config.json", "quantize_config.json"):
        _drop_run_specific_keys(out / name)
    log.info(
        "requantize: GPTQ %d-bit g%d on %d windows of %d tokens",
        section.bits,
        section.group_size,
        len(windows),
        calibration.seq_len,
    )
    return {
        "bits": section.bits,
        "group_size": section.group_size,
        "desc_act": section.desc_act,
        "sym": section.sym,
        "damp_percent": section.damp_percent,
        "calibration_windows": len(windows),
        "calibration_seq_len": calibration.seq_len,
    }


def estimate_gptq_bytes(merged_dir: Path, bits: int) -> int:
    """About how many bytes the GPTQ checkpoint of `merged_dir` takes: decoder-layer matrices at
    `bits` per weight plus ~10% for scales and zero points, every other tensor as stored."""
    reader = CheckpointReader(merged_dir)
    total = 0
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
