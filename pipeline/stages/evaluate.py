"""Stage 4, evaluate: every model on exactly the same token windows, against the model as trained.

Models, each loaded as a user would load it:
  baseline  the NF4 base + the adapter unmerged through PEFT: the model as trained, the reference
  base_nf4  the NF4 base alone (adapter disabled): what the fine-tune improved on
  merged    the merged 16-bit checkpoint
  gptq      the re-quantized checkpoint
The baseline is scored first; its final hidden states at the scored tokens are kept in a temporary file
and its output layer in memory, which recompute its exact log-probabilities while each later model is
compared with it token by token (KL, top-1 agreement), without the two models in memory together.
Output: results.json with the window protocol, per model and window the summed NLL, KL and top-1
agreements (the report's statistics are computed from these), and the greedy continuations of the
configured prompts.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from qlora_requant.eval.generate import greedy_continuations
from qlora_requant.eval.models import Placement, load_plain, load_separate_adapter, placed
from qlora_requant.eval.perplexity import (
    HiddenReference,
    Windows,
    conversation_windows,
    eval_windows,
    perplexity,
    score_windows,
)
from qlora_requant.eval.tasks import score_tasks
from qlora_requant.pipeline.checkpoint import dtype_of, is_bnb_4bit
from qlora_requant.pipeline.config import AdapterSection, EvaluationSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.files import require_free_space
from qlora_requant.pipeline.layout import BASELINE_REFERENCE, OFFLOAD, RESULTS
from qlora_requant.pipeline.stages.merge import vocabulary_rows
from qlora_requant.quant.calibration import Corpus, token_stream
from qlora_requant.quant.chat import render_conversation, render_prompt

log = logging.getLogger(__name__)


class Scorer:
    """Scores models on one set of windows against the baseline, recorded compactly (see HiddenReference)."""

    def __init__(self, section: EvaluationSection, windows: Windows, tokenizer, reference_path: Path):
        self.section, self.windows, self.tokenizer = section, windows, tokenizer
        self.reference = HiddenReference(reference_path, int(windows.scored_tokens().sum()))
        self.models: dict[str, dict] = {}
        self.generations: dict[str, list[str]] = {}
        self.tasks: dict[str, dict] = {}  # per task: metric and, per model, its score and per-sample outcomes
        # Prompts as text; conversations rendered with the chat template up to the assistant's answer.
        self.prompts = [
            p if isinstance(p, str) else render_prompt(tokenizer, [m.model_dump() for m in p]) for p in section.prompts
        ]

    def score(self, name: str, model, placement: dict[str, int], record: bool = False, outputs: bool = True) -> None:
        """Score `model` on the windows (with `record`, as the reference); with `outputs`, also generate the
        prompts' continuations and score the tasks."""
        started = time.perf_counter()
        scores = score_windows(model, self.windows, self.section.batch_size, self.reference, record)
        tokens = self.windows.scored_tokens().tolist()
        self.models[name] = {
            "ppl": perplexity(scores["nll"], tokens),
            "tokens": sum(tokens),
            "windows": len(tokens),
            "seconds": round(time.perf_counter() - started, 2),
            "placement": placement,
            "window_tokens": tokens,
            "window_nll": scores["nll"],
            **({} if record else {"window_kl": scores["kl"], "window_top1": scores["top1_agree"]}),
        }
        log.info("evaluate: %-9s ppl %.4f on %d tokens", name, self.models[name]["ppl"], sum(tokens))
        if outputs and self.section.prompts:
            self.generations[name] = greedy_continuations(
                model, self.tokenizer, self.prompts, self.section.max_new_tokens
            )
        if outputs and self.section.tasks:
            tasks = score_tasks(model, self.tokenizer, self.section.tasks, self.section.batch_size, self.section.seed)
            for task, scores in tasks.items():
                entry = self.tasks.setdefault(task, {"metric": scores["metric"], "models": {}})
                entry["models"][name] = {"value": scores["value"], "per_sample": scores["per_sample"]}


def run(
    context: StageContext, out: Path, *, evaluation: EvaluationSection, adapter: AdapterSection, models: list[str]
) -> dict:
    """Score baseline, base_nf4 and each of `models` (merged, gptq, ...: checkpoints of this run) on the same
    windows; write results.json into `out`.

    Returns a short summary; the scores themselves are in results.json.
    """
    from transformers import AutoTokenizer

    section, device, base, corpus = evaluation, context.device, context.inputs.base, context.inputs.evaluation
    model_dirs = {name: context.layout.model_dir(name) for name in models}
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[models[0]], trust_remote_code=context.trust_remote_code)
    windows = evaluation_windows(section, corpus, tokenizer)
    tokens, hidden = int(windows.scored_tokens().sum()), hidden_size(base.model_config)
    require_free_space(
        out,
        tokens * hidden * 4,
        f"the baseline's final hidden states ({tokens} scored tokens x {hidden}, float32; lower "
        "evaluation.max_windows to shrink it)",
    )
    scorer = Scorer(section, windows, tokenizer, out / BASELINE_REFERENCE)

    def placement(name: str) -> Placement:
        offload = out / OFFLOAD / name  # inside the stage's temporary folder; removed after each model
        return Placement(device, section.device_map == "auto", section.accelerate_max_memory(), offload)

    prequantized = is_bnb_4bit(base.model_config)  # a 4-bit save loads with its own quantization_config
    where = placement("baseline")
    separate = load_separate_adapter(
        vocabulary_rows(context.inputs.adapter, base, base.model_config),
        base.model_dir,
        adapter.weighted(),
        adapter.combination,
        None if prequantized else base.settings.to_transformers(),
        "auto" if prequantized else base.dtype,
        where,
    )
    scorer.score("baseline", separate, placed(separate.get_base_model(), where), record=True)
    with separate.disable_adapter():
        scorer.score("base_nf4", separate, placed(separate.get_base_model(), where), outputs=False)
    del separate
    gc.collect()
    plain_dtype = _plain_dtype(section.dtype, device)
    for name, model_dir in model_dirs.items():
        where = placement(name)
        model = load_plain(model_dir, where, plain_dtype)
        scorer.score(name, model, placed(model, where))
        del model
        gc.collect()
        shutil.rmtree(where.offload_folder, ignore_errors=True)
    (out / BASELINE_REFERENCE).unlink()
    shutil.rmtree(out / OFFLOAD, ignore_errors=True)

    protocol = {
        "kind": "conversations" if corpus.chat else "sliding windows" if section.stride else "non-overlapping windows",
        "seq_len": section.seq_len,
        "stride": section.stride,
        "bos": section.bos,
        "score": section.score,
        "windows": len(windows),
        "tokens": int(windows.scored_tokens().sum()),
        "compute_dtype": str(plain_dtype).removeprefix("torch."),
        "text": section.text.public_name(),
        "documents": len(corpus.texts),
    }
    models = {"base_nf4": scorer.models["base_nf4"], **scorer.models}  # display order: base_nf4 first
    results = {
        "protocol": protocol,
        "models": models,
        "generations": {
            "prompts": scorer.prompts,
            "max_new_tokens": section.max_new_tokens,
            "outputs": scorer.generations,
        },
        "tasks": scorer.tasks,
    }
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    return {"windows": len(windows), "models": list(scorer.models)}


def evaluation_windows(section: EvaluationSection, corpus: Corpus, tokenizer) -> Windows:
    """The evaluation windows: cut from the joined text, or one per conversation."""
    if corpus.chat:
        marked = section.score == "assistant"
        samples = [
            render_conversation(tokenizer, c, section.seq_len, marked, f"{corpus.where}: record {number}")
            for number, c in enumerate(corpus.conversations, 1)
        ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return conversation_windows(samples, section.score, pad or 0, section.max_windows, corpus.where)
    return eval_windows(
        token_stream(tokenizer, corpus.texts),
        section.seq_len,
        section.max_windows,
        section.stride,
        tokenizer.bos_token_id if section.bos else None,
        where=corpus.where,
    )


def hidden_size(model_config: dict) -> int:
    """Width of the final hidden states, under the names configs give it."""
    return next(model_config[key] for key in ("hidden_size", "n_embd", "d_model") if key in model_config)


def _plain_dtype(name: str, device: str) -> torch.dtype | str:
    """The compute dtype for the merged and GPTQ models (see EvaluationSection.dtype)."""
    if name != "auto":
        return dtype_of(name)
    return torch.float32 if device == "cpu" else "auto"
