"""Stage 4, evaluate: perplexity of every model on exactly the same token windows.

Models, each loaded as a user would load it:
  base_nf4  the NF4 base alone (adapter disabled): what the fine-tune improved on
  baseline  the NF4 base + the adapter unmerged through PEFT: the model as trained
  merged    the merged 16-bit checkpoint
  gptq      the re-quantized checkpoint
Output: results.json with the window protocol and, per model, PPL, tokens scored and the
summed NLL of every window (for later statistics).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import torch

from eval.models import load_plain, load_separate_adapter
from eval.perplexity import eval_windows, perplexity, window_nll
from pipeline.checkpoint import dtype_of, is_bnb_4bit, read_model_config
from pipeline.config import RunConfig
from pipeline.stages.dequantize import bnb_settings, load_dtype
from quant.calibration import token_stream

log = logging.getLogger(__name__)

RESULTS = "results.json"


def _score(name: str, model, windows: torch.Tensor, batch_size: int, tokens_per_window: int) -> dict:
    started = time.perf_counter()
    nll = window_nll(model, windows, batch_size)
    result = {"ppl": perplexity(nll, tokens_per_window), "tokens": len(windows) * tokens_per_window,
              "windows": len(windows), "seconds": round(time.perf_counter() - started, 2),
              "window_nll": nll.tolist()}
    log.info("evaluate: %-9s ppl %.4f on %d tokens", name, result["ppl"], result["tokens"])
    return result


def run_evaluate(config: RunConfig, device: str, plain_models: dict[str, Path], texts: list[str],
                 out_dir: Path) -> dict:
    """Score base_nf4, baseline and each of `plain_models` (merged, gptq, ...: name -> checkpoint folder)
    on the same windows; write results.json into `out_dir`.

    Returns a short summary; the scores themselves are in results.json.
    """
    from transformers import AutoTokenizer

    section = config.evaluation
    source = section.text
    tokenizer = AutoTokenizer.from_pretrained(next(iter(plain_models.values())))
    windows = eval_windows(token_stream(tokenizer, texts), section.seq_len, section.max_windows,
                           where=source.describe())
    tokens_per_window = section.seq_len - 1

    base_config = read_model_config(config.base.path)
    prequantized = is_bnb_4bit(base_config)
    quantization = None if prequantized else bnb_settings(config.base).to_transformers()
    dtype = load_dtype(config.base, base_config) if not prequantized else "auto"
    models: dict[str, dict] = {}
    separate = load_separate_adapter(config.base.path, config.adapter.weighted(), config.adapter.combination,
                                     quantization, dtype, device)
    with separate.disable_adapter():
        models["base_nf4"] = _score("base_nf4", separate, windows, section.batch_size, tokens_per_window)
    models["baseline"] = _score("baseline", separate, windows, section.batch_size, tokens_per_window)
    del separate
    gc.collect()
    plain_dtype = _plain_dtype(section.dtype, device)
    for name, model_dir in plain_models.items():
        model = load_plain(model_dir, device, plain_dtype)
        models[name] = _score(name, model, windows, section.batch_size, tokens_per_window)
        del model
        gc.collect()

    results = {"protocol": {"kind": "non-overlapping windows", "seq_len": section.seq_len,
                            "windows": len(windows), "tokens_per_window": tokens_per_window, "bos": "none",
                            "compute_dtype": str(plain_dtype).removeprefix("torch."),
                            "text": source.describe(), "documents": len(texts)},
               "models": models}
    (out_dir / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    return {"windows": len(windows), "models": list(models)}


def _plain_dtype(name: str, device: str) -> torch.dtype | str:
    """The compute dtype for the merged and GPTQ models (see EvaluationSection.dtype)."""
    if name != "auto":
        return dtype_of(name)
    return torch.float32 if device == "cpu" else "auto"
