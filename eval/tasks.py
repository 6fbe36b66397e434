"""Task accuracy through lm-evaluation-harness, on the model instance the evaluation has already loaded.

Each task is scored by lm-eval's own `simple_evaluate` (its prompts, few-shot samples and metric), seeded, with
every sample logged, so that two models are compared sample by sample: the same samples for every model.
"""

from __future__ import annotations

import logging
from functools import cache

log = logging.getLogger(__name__)

RESULT_KEYS = ("name", "alias", "sample_len", "samples")


@cache
def task_manager(registered: bool):
    """lm-eval's task index, built once: with its registered tasks (indexing them takes seconds), or empty for
    local task configs, which are given whole."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registered)


def score_tasks(model, tokenizer, tasks: list, batch_size: int, seed: int) -> dict[str, dict]:
    """Per task (TaskSection): {metric, higher_is_better, value, per_sample} for `model`, per_sample ordered by
    the task's sample index. lm-eval's first reported metric is the task's metric (acc for multiple choice)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    # HFLM ties the model's weights again on construction; the model is scored as it was loaded (on a PEFT model
    # with wrapped embeddings, tying again fails), so that call does nothing here.
    model.tie_weights = lambda *args, **kwargs: None
    try:
        language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    finally:
        del model.tie_weights
    scores = {}
    for task in tasks:
        name = task.task_name()
        results = simple_evaluate(
            model=language_model,
            tasks=[task.config()],
            task_manager=task_manager(registered=task.name is not None),
            limit=task.limit,
            num_fewshot=task.num_fewshot,
            apply_chat_template=task.chat_template,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        reported = results["results"][name]
        metric_key = next(key for key in reported if key not in RESULT_KEYS and "_stderr" not in key)
        metric, _, kept = metric_key.partition(",")
        samples = sorted(
            (sample for sample in results["samples"][name] if sample.get("filter", kept) == kept),
            key=lambda sample: sample["doc_id"],
        )
        scores[name] = {
            "metric": metric,
            "higher_is_better": bool(results.get("higher_is_better", {}).get(name, {}).get(metric, True)),
            "value": float(reported[metric_key]),
            "per_sample": [float(sample[metric]) for sample in samples],
        }
        log.info("evaluate: task %s %s %.4f on %d samples", name, metric, scores[name]["value"], len(samples))
    return scores
