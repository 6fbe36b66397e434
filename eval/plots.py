"""The report's plots, as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

from qlora_requant.eval.schema import GptqLoss, ModelScores, TaskScores, Variant

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def estimate_with_interval(
    axis: Axes,
    at: float,
    estimate: float,
    interval: tuple[float, float] | None,
    vertical: bool = False,
    symbol: str = "o",
    **marker,
) -> float:
    """Draw an estimate as a dot at `at` (its y; its x when `vertical`) and its interval, if any, as a capped bar from
    the interval's own ends: nothing assumes that the interval contains the estimate. Returns the far end of what
    was drawn, to annotate beside."""

    def place(value: float) -> tuple[float, float]:
        return (at, value) if vertical else (value, at)

    if interval is not None:
        low, high = interval
        bar = {"yerr" if vertical else "xerr": abs(high - low) / 2}
        axis.errorbar(*place((low + high) / 2), fmt="none", ecolor=marker.get("color"), capsize=4, **bar)
    axis.plot(*place(estimate), symbol, **marker)
    return max([estimate, *(interval or ())])


def ppl_change_with_intervals(models: dict[str, ModelScores], names: list[str], ppl_limit: float | None) -> bytes:
    """The PPL change of each of `names` against the baseline, with its 95% bootstrap interval where it has one, and
    the PPL gate's limit (when configured)."""
    rows = [(name, models[name]) for name in names]
    figure, axis = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    for i, (name, row) in enumerate(rows):
        color = "tab:red" if name.startswith("gptq") else "tab:blue"
        end = estimate_with_interval(axis, i, row.delta_pct, row.delta_pct_ci95, color=color)
        axis.annotate(f"PPL {row.ppl:.3f}", (end, i), xytext=(6, 0), textcoords="offset points", va="center")
    axis.axvline(0, color="gray", linewidth=1)
    _gate_line(axis, ppl_limit, vertical=True)
    axis.set_yticks(range(len(rows)), [name for name, _ in rows])
    axis.invert_yaxis()
    axis.set_xlabel("PPL change vs baseline (%), 95% paired bootstrap interval")
    axis.set_title("Perplexity against the model as trained")
    return _png(figure)


def window_nll_differences(models: dict[str, dict], names: list[str]) -> bytes:
    """Distribution over windows of the mean token NLL difference, model minus baseline."""
    baseline = models["baseline"]
    reference = [n / t for n, t in zip(baseline["window_nll"], baseline["window_tokens"])]
    differences = {
        name: [n / t - r for n, t, r in zip(models[name]["window_nll"], models[name]["window_tokens"], reference)]
        for name in names
    }
    values = [d for per_model in differences.values() for d in per_model]
    bins = np.linspace(min(values), max(values), 31) if max(values) > min(values) else 30
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for name, per_window in differences.items():
        axis.hist(per_window, bins=bins, alpha=0.6, label=name)
    axis.axvline(0, color="gray", linewidth=1)
    axis.set_xlabel("mean token NLL difference per window, model - baseline (nats)")
    axis.set_ylabel("windows")
    axis.set_title("Per-window NLL difference")
    axis.legend()
    return _png(figure)


def size_against_quality(variants: list[Variant], candidate: str | None, ppl_limit: float | None) -> bytes:
    """Each GPTQ variant's size on disk against its PPL change, with the 95% interval where it has one: passing every
    gate a green dot, failing one a red cross, the release candidate named as such; the PPL gate's limit drawn."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for variant in variants:
        size = variant.size_bytes / 1e6
        style = {"symbol": "o", "color": "tab:green"} if variant.gates_passed else {"symbol": "X", "color": "tab:red"}
        end = estimate_with_interval(
            axis, size, variant.delta_pct, variant.delta_pct_ci95, vertical=True, markersize=9, **style
        )
        chosen = variant.name == candidate
        label = f"{variant.name} (release candidate)" if chosen else variant.name
        axis.annotate(
            label, (size, end), xytext=(4, 4), textcoords="offset points", weight="bold" if chosen else "normal"
        )
    axis.axhline(0, color="gray", linewidth=1)
    _gate_line(axis, ppl_limit, vertical=False)
    axis.set_xlabel("size on disk (MB)")
    axis.set_ylabel("PPL change vs baseline (%), 95% interval")
    axis.set_title("GPTQ variants (green dot: passes every gate; red cross: fails one)")
    return _png(figure)


def _gate_line(axis: Axes, limit: float | None, vertical: bool) -> None:
    """The PPL gate's limit as a dashed line, labelled (nothing when no PPL gate is configured)."""
    if limit is None:
        return
    label = f"gate: PPL increase at most {limit:g}% (95% CI upper bound)"
    line = axis.axvline if vertical else axis.axhline
    line(limit, color="tab:orange", linestyle="--", linewidth=1.2, label=label)
    axis.legend(loc="best", fontsize=8)


def task_changes(tasks: dict[str, TaskScores], drop_limit: float | None = None) -> bytes:
    """Each model's task score change against the baseline in points, with its paired 95% interval where it has
    one, and the task-drop gate's limit when one limit holds for every task."""
    rows = [
        (f"{task} / {name}", score)
        for task, r in tasks.items()
        for name, score in r.models.items()
        if score.delta is not None
    ]
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    for i, (_, score) in enumerate(rows):
        estimate_with_interval(axis, i, score.delta, score.delta_ci95, color="tab:blue")
    axis.axvline(0, color="gray", linewidth=1)
    if drop_limit is not None:
        label = f"gate: drop at most {drop_limit:g} points (95% CI lower bound)"
        axis.axvline(-drop_limit, color="tab:orange", linestyle="--", linewidth=1.2, label=label)
        axis.legend(loc="best", fontsize=8)
    axis.set_yticks(range(len(rows)), [label for label, _ in rows])
    axis.invert_yaxis()
    axis.set_xlabel("score change vs baseline (points), 95% paired bootstrap interval")
    axis.set_title("Task scores against the model as trained")
    return _png(figure)


def gptq_error_by_layer(losses: list[GptqLoss], model: str) -> bytes:
    """gptqmodel's per-module GPTQ loss of the GPTQ model `model` across layers, one line per module."""
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for module in dict.fromkeys(row.module for row in losses):
        points = [(row.layer, row.loss) for row in losses if row.module == module]
        axis.plot(*zip(*points), marker="o", label=module)
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("layer")
    axis.set_ylabel("GPTQ loss (gptqmodel)")
    axis.set_title(f"GPTQ error per layer and module: {model}")
    axis.legend(fontsize=7, ncol=2)
    return _png(figure)
