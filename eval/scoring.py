"""What every scoring stage does with a loaded model: its scores on the run's windows against the reference, the
greedy continuations of the prompts and the task scores, as one JSON-ready entry (scores.json).

scores.json: {"models": {name: per-window scores}, "generations": {name: [texts]}, "tasks": {task: {"metric",
"models": {name: {value, per_sample}}}}}; the report joins the reference's and every scoring stage's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from qlora_requant.eval.generate import greedy_continuations
from qlora_requant.eval.perplexity import Reference, Windows, perplexity, score_windows
from qlora_requant.eval.tasks import score_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringSettings:
    """What a scoring stage computes beyond the windows' scores (from the evaluation section)."""

    batch_size: int
    prompts: list[str]  # rendered: conversations through the fine-tune's chat template
    max_new_tokens: int
    tasks: list  # TaskSection
    seed: int


def score_model(
    name: str,
    model,
    placement: dict[str, int],
    windows: Windows,
    reference: Reference,
    settings: ScoringSettings,
    tokenizer,
    on_windows: Callable[[int], None] | None = None,
    record: bool = False,
    outputs: bool = True,
) -> dict:
    """`model`'s scores.json entry. With `record`, it is the reference and is written into `reference`; with
    `outputs`, its continuations of the prompts and its task scores are included. It holds no time (the stage's
    record does), so that scoring the same model on the same windows writes the same bytes."""
    scores = score_windows(model, windows, settings.batch_size, reference, record, on_windows)
    tokens = windows.scored_tokens().tolist()
    entry = {
        "ppl": perplexity(scores["nll"], tokens),
        "tokens": sum(tokens),
        "windows": len(tokens),
        "placement": placement,
        "window_tokens": tokens,
        "window_nll": scores["nll"],
        **({} if record else {"window_kl": scores["kl"], "window_top1": scores["top1_agree"]}),
    }
    log.info("score: %-9s ppl %.4f on %d tokens", name, entry["ppl"], sum(tokens))
    result: dict = {"models": {name: entry}, "generations": {}, "tasks": {}}
    if outputs and settings.prompts:
        result["generations"][name] = greedy_continuations(model, tokenizer, settings.prompts, settings.max_new_tokens)
    if outputs and settings.tasks:
        tasks = score_tasks(model, tokenizer, settings.tasks, settings.batch_size, settings.seed)
        for task, task_scores in tasks.items():
            result["tasks"][task] = {
                "metric": task_scores["metric"],
                "models": {name: {"value": task_scores["value"], "per_sample": task_scores["per_sample"]}},
            }
    return result


def joined(*parts: dict) -> dict:
    """scores.json entries of several models as one."""
    whole: dict = {"models": {}, "generations": {}, "tasks": {}}
    for part in parts:
        whole["models"].update(part["models"])
        whole["generations"].update(part["generations"])
        for task, entry in part["tasks"].items():
            whole["tasks"].setdefault(task, {"metric": entry["metric"], "models": {}})["models"].update(entry["models"])
    return whole
