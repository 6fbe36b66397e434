"""GPTQ re-quantization through gptqmodel, the maintained successor of auto-gptq."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ settings as written into the checkpoint's quantization_config."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    batch_size: int = 8


def gptq_quantize(
    model_dir: Path,
    calibration: list[dict[str, torch.Tensor]],
    settings: GptqSettings,
    device: str,
    out_dir: Path,
    log_dir: Path,
    trust_remote_code: bool = False,
) -> None:
    """Quantize the 16-bit checkpoint in `model_dir` on `calibration` windows and save it to `out_dir`.

    gptqmodel's per-module logs (GPTQ loss per layer) go to `log_dir` instead of ./logs.
    """
    # gptqmodel sizes its CPU worker pool at import; with 2 cores or fewer it refuses to start without this.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper import loop_processor

    # gptqmodel 7.6 writes these logs under a module-level relative path; point it at the run.
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = log_dir

    config = QuantizeConfig(
        bits=settings.bits,
        group_size=settings.group_size,
        desc_act=settings.desc_act,
        sym=settings.sym,
        damp_percent=settings.damp_percent,
    )
    model = GPTQModel.load(str(model_dir), config, device=device, trust_remote_code=trust_remote_code)
    model.quantize(calibration, batch_size=settings.batch_size)
    model.save(str(out_dir))
