"""Every model against the baseline (NF4 base + separate adapter, the model as trained), and the gates."""

from __future__ import annotations

from qlora_requant.eval.perplexity import perplexity
from qlora_requant.eval.statistics import bootstrap_mean_difference, bootstrap_ppl_change, mcnemar_exact, no_interval

BASELINE = "baseline"
MERGE_BASES = ("nf4", "original")
MODEL_LABELS = {
    "base_nf4": "NF4 base alone (no adapter)",
    "baseline": "NF4 base + adapter (as trained)",
    "merged": "merged 16-bit",
    "gptq": "GPTQ",
}


def model_label(name: str) -> str:
    """What a result row is, in words: 'gptq_w3g128' is the GPTQ variant w3g128, 'merged_original' the merge
    into the other merge base."""
    if not name.startswith(("merged", "gptq")):
        return MODEL_LABELS.get(name, name)
    kind, _, rest = name.partition("_")
    merge_base = next((base for base in MERGE_BASES if rest == base or rest.endswith(f"_{base}")), "")
    variant = rest.removesuffix(merge_base).rstrip("_")
    label = MODEL_LABELS[kind] + (f" {variant}" if variant else "")
    return f"{label}, merged into {merge_base} weights" if merge_base else label


def change(value: float, reference: float) -> dict[str, float]:
    """Absolute and percent change of `value` against `reference`."""
    return {"abs": value - reference, "pct": 100.0 * (value - reference) / reference}


def compare_to_baseline(models: dict[str, dict], bootstrap_samples: int, seed: int) -> dict[str, dict]:
    """Per model, in the order scored: PPL and its change against the baseline with a paired bootstrap
    95% interval (None where there is none), mean token KL(baseline || model) and top-1 agreement with the
    baseline."""
    reference = models[BASELINE]
    compared = {}
    for name, result in models.items():
        tokens = sum(result["window_tokens"])
        ppl = perplexity(result["window_nll"], result["window_tokens"])
        delta = change(ppl, perplexity(reference["window_nll"], reference["window_tokens"]))
        row = {
            "ppl": ppl,
            "tokens": tokens,
            "windows": len(result["window_nll"]),
            "delta_ppl": delta["abs"],
            "delta_pct": delta["pct"],
            "placement": result.get("placement"),
        }
        if name != BASELINE:
            row["delta_pct_ci95"] = bootstrap_ppl_change(
                result["window_nll"], reference["window_nll"], result["window_tokens"], bootstrap_samples, seed
            )
            row["kl"] = sum(result["window_kl"]) / tokens
            row["top1_agreement"] = sum(result["window_top1"]) / tokens
        compared[name] = row
    return compared


def compare_tasks(tasks: dict[str, dict], bootstrap_samples: int, seed: int) -> dict[str, dict]:
    """Per task: its metric, samples and, per model, the score and (but for the baseline) its change against the
    baseline in points with a paired bootstrap 95% interval over samples (None where there is none), and McNemar's
    exact p for accuracy."""
    compared = {}
    for task, result in tasks.items():
        reference = result["models"][BASELINE]["per_sample"]
        rows = {}
        for name, scores in result["models"].items():
            row = {"value": scores["value"]}
            if name != BASELINE:
                values = scores["per_sample"]
                row["delta"] = 100.0 * (sum(values) - sum(reference)) / len(reference)
                row["delta_ci95"] = bootstrap_mean_difference(values, reference, bootstrap_samples, seed)
                row["mcnemar_p"] = mcnemar_exact(values, reference)
            rows[name] = row
        compared[task] = {"metric": result["metric"], "samples": len(reference), "models": rows}
    return compared


def judge_gates(compared: dict[str, dict], gate: dict, model: str = "gptq", tasks: dict | None = None) -> dict:
    """Every configured gate on a GPTQ model against the baseline (`tasks`: compare_tasks' rows).

    The PPL gate is judged on the upper bound of the 95% interval, a task drop on the lower bound of its
    interval: a change that could plausibly exceed the limit fails, and so does one without an interval.
    """
    row, name = compared[model], model_label(model)
    checks = []
    if gate.get("max_ppl_increase_pct") is not None:
        checks.append(_ppl_check(row, model, gate["max_ppl_increase_pct"]))
    if gate.get("max_kl") is not None:
        limit = gate["max_kl"]
        checks.append(
            _check(
                "max_kl",
                row["kl"],
                limit,
                row["kl"] <= limit,
                f"{name} mean token KL {row['kl']:#.3g} nats",
                f"{limit:.3g}",
                f"{row['kl'] - limit:.3g} nats",
            )
        )
    if gate.get("min_top1_agreement") is not None:
        limit = gate["min_top1_agreement"]
        checks.append(
            _check(
                "min_top1_agreement",
                row["top1_agreement"],
                limit,
                row["top1_agreement"] >= limit,
                f"{name} top-1 agreement {row['top1_agreement']:.2%}",
                f"{limit:.2%}",
                f"{(limit - row['top1_agreement']) * 100:.2f} percentage points",
                minimum=True,
            )
        )
    drops = gate.get("max_task_drop")
    for task, result in (tasks or {}).items() if drops is not None else ():
        limit = drops.get(task) if isinstance(drops, dict) else drops
        if limit is None:
            continue
        checks.append(_task_drop_check(task, result, model, limit))
    failed = [c for c in checks if not c["passed"]]
    message = (
        "; ".join(c["message"] for c in failed)
        if failed
        else "; ".join(c["message"] for c in checks)
        if checks
        else "no gate configured"
    )
    return {
        "enabled": bool(checks),
        "passed": not failed,
        "checks": checks,
        "failed": [c["name"] for c in failed],
        "message": message,
    }


def _ppl_check(row: dict, model: str, limit: float) -> dict:
    """The PPL gate, on the upper bound of the interval; failed closed without one."""
    what = f"{model_label(model)} PPL change {row['delta_pct']:+.2f}%"
    if row["delta_pct_ci95"] is None:
        reason = no_interval(row["windows"], "window")
        return _unjudged("max_ppl_increase_pct", limit, f"{what} ({reason})", f"{limit:.2f}%", "upper bound")
    low, high = row["delta_pct_ci95"]
    return _check(
        "max_ppl_increase_pct",
        high,
        limit,
        high <= limit,
        f"{what} (95% CI {low:+.2f}%..{high:+.2f}%): upper bound {high:+.2f}%",
        f"{limit:.2f}%",
        f"{high - limit:.2f} percentage points",
    )


def _task_drop_check(task: str, result: dict, model: str, limit: float) -> dict:
    """A task's drop gate, on the lower bound of the interval (the largest drop it allows); failed closed without
    one."""
    scores = result["models"][model]
    what = f"{model_label(model)} {task} {result['metric']} {scores['delta']:+.2f} points"
    if scores["delta_ci95"] is None:
        reason = no_interval(result["samples"], "sample")
        return _unjudged("max_task_drop", limit, f"{what} ({reason})", f"{limit:.2f} points", "largest drop")
    low, high = scores["delta_ci95"]
    drop = -low if low < 0 else 0.0
    return _check(
        "max_task_drop",
        drop,
        limit,
        drop <= limit,
        f"{what} (95% CI {low:+.2f}..{high:+.2f}): drop up to {drop:.2f} points",
        f"{limit:.2f} points",
        f"{drop - limit:.2f} points",
    )


def _check(
    name: str, value: float, limit: float, passed: bool, what: str, shown_limit: str, by: str, minimum: bool = False
) -> dict:
    """A judged gate: a maximum (`value` within `limit`) or a `minimum` (`value` at least `limit`), in words."""
    if minimum:
        verdict = f"is at least the minimum {shown_limit}" if passed else f"is below the minimum {shown_limit} by {by}"
    else:
        verdict = f"within limit {shown_limit}" if passed else f"fails limit {shown_limit} by {by}"
    return {"name": name, "value": value, "limit": limit, "passed": passed, "message": f"{what} {verdict}"}


def closest_to_passing(gates: dict[str, dict]) -> str | None:
    """Of GPTQ models none of which passes (their judge_gates results by name), the one that came closest: fewest
    failed checks, then the smallest summed shortfall relative to each limit (a check without a value counts 1)."""

    def shortfall(gate: dict) -> tuple[int, float]:
        failed = [check for check in gate["checks"] if not check["passed"]]
        relative = [
            1.0 if check["value"] is None else abs(check["value"] - check["limit"]) / max(abs(check["limit"]), 1e-12)
            for check in failed
        ]
        return len(failed), sum(relative)

    return min(gates, key=lambda name: shortfall(gates[name])) if gates else None


def _unjudged(name: str, limit: float, what: str, shown_limit: str, bound: str) -> dict:
    """A gate judged on an interval that could not be computed: it fails closed, without a value."""
    message = f"{what}: fails limit {shown_limit}, its {bound} unknown"
    return {"name": name, "value": None, "limit": limit, "passed": False, "message": message}
