"""Stage 4, evaluate: every model on exactly the same token windows, against the model as trained.

Models, each loaded as a user would load it:
  baseline  the NF4 base + the adapter unmerged through PEFT: the model as trained, the reference
  base_nf4  the NF4 base alone (adapter disabled): what the fine-tune improved on
  merged    the merged 16-bit checkpoint
  gptq      the re-quantized checkpoint
The baseline is scored first and its next-token log-probabilities are kept in a temporary file,
so each later model is compared with it token by token (KL, top-1 agreement) without the two
being in memory together. Output: results.json with the window protocol, per model and window the
summed NLL, KL and top-1 agreements (the report's statistics are computed from these), and the
greedy continuations of the configured prompts.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import torch

from eval.generate import greedy_continuations
from eval.models import load_plain, load_separate_adapter
from eval.perplexity import ReferenceLogProbs, Windows, eval_windows, perplexity, score_windows
from pipeline.checkpoint import dtype_of, is_bnb_4bit, read_model_config
from pipeline.config import EvaluationSection, RunConfig
from pipeline.files import require_free_space
from pipeline.stages.dequantize import bnb_settings, load_dtype
from quant.calibration import token_stream

log = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
RESULTS = "results.json"
REFERENCE_FILE = ".baseline_logprobs.npy"


class Scorer:
    """Scores models on one set of windows against the baseline's recorded log-probabilities."""

    def __init__(self, section: EvaluationSection, windows: Windows, tokenizer, reference_path: Path):
        self.section, self.windows, self.tokenizer = section, windows, tokenizer
        self.reference = ReferenceLogProbs(reference_path, windows)
        self.models: dict[str, dict] = {}
        self.generations: dict[str, list[str]] = {}

    def score(self, name: str, model, record: bool = False, generate: bool = True) -> None:
        started = time.perf_counter()
        scores = score_windows(model, self.windows, self.section.batch_size, self.reference, record)
        tokens = self.windows.scored_tokens().tolist()
        self.models[name] = {"ppl": perplexity(scores["nll"], tokens), "tokens": sum(tokens),
                             "windows": len(tokens), "seconds": round(time.perf_counter() - started, 2),
                             "window_tokens": tokens, "window_nll": scores["nll"],
                             **({} if record else {"window_kl": scores["kl"], "window_top1": scores["top1_agree"]})}
        log.info("evaluate: %-9s ppl %.4f on %d tokens", name, self.models[name]["ppl"], sum(tokens))
        if generate and self.section.prompts:
            self.generations[name] = greedy_continuations(model, self.tokenizer, self.section.prompts,
                                                          self.section.max_new_tokens)


def run_evaluate(config: RunConfig, device: str, plain_models: dict[str, Path], texts: list[str],
                 out_dir: Path) -> dict:
    """Score baseline, base_nf4 and each of `plain_models` (merged, gptq, ...: name -> checkpoint folder)
    on the same windows; write results.json into `out_dir`.

    Returns a short summary; the scores themselves are in results.json.
    """
    from transformers import AutoTokenizer

    section = config.evaluation
    tokenizer = AutoTokenizer.from_pretrained(next(iter(plain_models.values())),
                                              trust_remote_code=config.trust_remote_code)
    windows = eval_windows(token_stream(tokenizer, texts), section.seq_len, section.max_windows, section.stride,
                           tokenizer.bos_token_id if section.bos else None, where=section.text.describe())
    vocab = len(tokenizer)
    require_free_space(out_dir, len(windows) * (windows.seq_len - 1) * vocab * 4,
                       f"the baseline's log-probabilities ({len(windows)} windows x {windows.seq_len - 1} tokens x "
                       f"{vocab} vocabulary, float32; lower evaluation.max_windows to shrink it)")
    scorer = Scorer(section, windows, tokenizer, out_dir / REFERENCE_FILE)

    base_config = read_model_config(config.base.path)
    prequantized = is_bnb_4bit(base_config)
    quantization = None if prequantized else bnb_settings(config.base).to_transformers()
    dtype = load_dtype(config.base, base_config) if not prequantized else "auto"
    separate = load_separate_adapter(config.base.path, config.adapter.weighted(), config.adapter.combination,
                                     quantization, dtype, device)
    scorer.score("baseline", separate, record=True)
    with separate.disable_adapter():
        scorer.score("base_nf4", separate, generate=False)
    del separate
    gc.collect()
    plain_dtype = _plain_dtype(section.dtype, device)
    for name, model_dir in plain_models.items():
        model = load_plain(model_dir, device, plain_dtype)
        scorer.score(name, model)
        del model
        gc.collect()
    (out_dir / REFERENCE_FILE).unlink()

    protocol = {"kind": "sliding windows" if section.stride else "non-overlapping windows",
                "seq_len": section.seq_len, "stride": section.stride, "bos": section.bos,
                "windows": len(windows), "tokens": int(windows.scored_tokens().sum()),
                "compute_dtype": str(plain_dtype).removeprefix("torch."), "text": section.text.describe(),
                "documents": len(texts)}
    models = {"base_nf4": scorer.models["base_nf4"], **scorer.models}  # display order: base_nf4 first
    results = {"protocol": protocol, "models": models,
               "generations": {"prompts": section.prompts, "max_new_tokens": section.max_new_tokens,
                               "outputs": scorer.generations}}
    (out_dir / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    return {"windows": len(windows), "models": list(scorer.models)}


def _plain_dtype(name: str, device: str) -> torch.dtype | str:
    """The compute dtype for the merged and GPTQ models (see EvaluationSection.dtype)."""
    if name != "auto":
        return dtype_of(name)
    return torch.float32 if device == "cpu" else "auto"
