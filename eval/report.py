"""The quality-loss report: report.json for scripts, report.md and a console table for people."""

from __future__ import annotations

import json
from pathlib import Path

from eval.compare import model_label

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.md")


def model_table(models: dict[str, dict]) -> list[list[str]]:
    """Rows of the PPL table: header first."""
    rows = [["model", "what it is", "PPL", "tokens", "vs baseline"]]
    for name, result in models.items():
        vs = "reference" if name == "baseline" else f"{result['delta_ppl']:+.3f} ({result['delta_pct']:+.2f}%)"
        rows.append([name, model_label(name), f"{result['ppl']:.3f}", str(result["tokens"]), vs])
    return rows


def console_table(rows: list[list[str]]) -> str:
    """Plain aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    """The headline findings in words, shared by the console and report.md."""
    models, gate = report["models"], report["gate"]
    lines = [
        f"Adapter gain on the eval text: PPL {models['base_nf4']['ppl']:.3f} (NF4 base alone) -> "
        f"{models['baseline']['ppl']:.3f} (with adapter), {report['adapter_ppl_change_pct']:+.2f}%.",
        f"Merge: {models['merged']['delta_pct']:+.3f}% PPL against the separate adapter.",
        f"Re-quantization: GPTQ {report['requantize']['bits']}-bit g{report['requantize']['group_size']} "
        f"{models['gptq']['delta_pct']:+.3f}% PPL against the separate adapter.",
    ]
    if gate["enabled"]:
        lines.append(f"Release gate: {'PASS' if gate['passed'] else 'FAIL'}: {gate['message']}.")
    else:
        lines.append("Release gate: none configured (set gate.max_ppl_increase_pct).")
    return lines


def render_markdown(report: dict) -> str:
    protocol = report["protocol"]
    parts = [
        "# qlora-requant quality report",
        "",
        *[f"- {line}" for line in summary_lines(report)],
        "",
        "## Perplexity",
        "",
        f"All models scored on the same {protocol['windows']} non-overlapping windows of {protocol['seq_len']} "
        f"tokens from `{protocol['text']}` ({protocol['tokens_per_window']} scored tokens per window, no BOS). "
        "The baseline is the model as trained: the base loaded in 4-bit by bitsandbytes with the training "
        "settings, the adapter applied unmerged by PEFT.",
        "",
        markdown_table(model_table(report["models"])),
        "",
        "## Artifacts",
        "",
        *[f"- {name}: `{path}`" for name, path in report["artifacts"].items()],
        "",
        "## Stages",
        "",
        markdown_table([["stage", "seconds", "RSS at start (MB)", "peak RSS (MB)"]] + [
            [name, f"{stage['seconds']:.1f}", f"{stage.get('rss_start_mb', float('nan')):.0f}",
             f"{stage['peak_rss_mb']:.0f}"] for name, stage in report["stages"].items()
        ]),
        "",
    ]
    return "\n".join(parts)


def write_report(report: dict, run_dir: Path) -> None:
    """Write report.json and report.md into the run directory, each complete or not at all."""
    for name, text in zip(REPORT_FILES, (json.dumps(report, indent=2) + "\n", render_markdown(report))):
        partial = run_dir / f".{name}.partial"
        partial.write_text(text)
        partial.replace(run_dir / name)
