"""Stage 3, requantize: GPTQ on calibration windows of the fine-tuning domain.

Input: the merged checkpoint and calibration texts. Output: a GPTQ checkpoint that plain
transformers loads, with quantization_config in config.json and no calibration text in it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import RequantizeSection
from quant.calibration import calibration_windows, token_stream
from quant.gptq import GptqSettings, gptq_quantize

log = logging.getLogger(__name__)


def run_requantize(section: RequantizeSection, texts: list[str], merged_dir: Path, device: str, out_dir: Path) -> dict:
    """Quantize `merged_dir` with GPTQ into `out_dir`; return a summary for the report."""
    from transformers import AutoTokenizer

    calibration = section.calibration
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    windows = calibration_windows(token_stream(tokenizer, texts), calibration.n_samples, calibration.seq_len,
                                  calibration.seed, where=calibration.describe())
    settings = GptqSettings(bits=section.bits, group_size=section.group_size, desc_act=section.desc_act,
                            sym=section.sym, damp_percent=section.damp_percent, batch_size=section.batch_size)
    gptq_quantize(merged_dir, windows, settings, device, out_dir, log_dir=out_dir.parent / "logs")
    _drop_calibration_text(out_dir / "config.json")
    log.info("requantize: GPTQ %d-bit g%d on %d windows of %d tokens", section.bits, section.group_size,
             len(windows), calibration.seq_len)
    return {"bits": section.bits, "group_size": section.group_size, "desc_act": section.desc_act,
            "sym": section.sym, "damp_percent": section.damp_percent,
            "calibration_windows": len(windows), "calibration_seq_len": calibration.seq_len}


def _drop_calibration_text(config_path: Path) -> None:
    """Some GPTQ writers store the calibration list in quantization_config.dataset; never ship it."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).pop("dataset", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
