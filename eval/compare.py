"""Comparison of every model against the baseline (NF4 base + separate adapter, the model as trained)."""

from __future__ import annotations

BASELINE = "baseline"
MODEL_LABELS = {
    "base_nf4": "NF4 base alone (no adapter)",
    "baseline": "NF4 base + adapter (as trained)",
    "merged": "merged 16-bit",
    "gptq": "GPTQ",
}


def model_label(name: str) -> str:
    """What a result row is, in words; 'merged_original' is the merge into the other merge base."""
    kind, _, merge_base = name.partition("_") if name.startswith(("merged_", "gptq_")) else (name, "", "")
    label = MODEL_LABELS.get(kind, name)
    return f"{label}, merged into {merge_base} weights" if merge_base else label


def change(value: float, reference: float) -> dict[str, float]:
    """Absolute and percent change of `value` against `reference`."""
    return {"abs": value - reference, "pct": 100.0 * (value - reference) / reference}


def compare_to_baseline(models: dict[str, dict]) -> dict[str, dict]:
    """Per model, in the order scored: ppl, tokens scored, and its PPL change against the baseline."""
    reference = models[BASELINE]["ppl"]
    compared = {}
    for name, result in models.items():
        delta = change(result["ppl"], reference)
        compared[name] = {"ppl": result["ppl"], "tokens": result["tokens"], "windows": result["windows"],
                          "delta_ppl": delta["abs"], "delta_pct": delta["pct"]}
    return compared


def judge_gate(compared: dict[str, dict], max_ppl_increase_pct: float | None) -> dict:
    """The release gate on the GPTQ model's PPL increase over the baseline."""
    value = compared["gptq"]["delta_pct"]
    if max_ppl_increase_pct is None:
        return {"enabled": False, "passed": True, "value_pct": value, "max_ppl_increase_pct": None,
                "message": "no gate configured"}
    passed = value <= max_ppl_increase_pct
    return {"enabled": True, "passed": passed, "value_pct": value, "max_ppl_increase_pct": max_ppl_increase_pct,
            "message": f"GPTQ PPL change {value:+.2f}% {'<=' if passed else '>'} limit {max_ppl_increase_pct:.2f}%"}
