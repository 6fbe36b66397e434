"""The quality-loss report: report.json for scripts, report.md and report.html for people, a console table.

Rendering only: pipeline/stages/report.py builds the report (a `Report`, see schema.py) and writes the files.
"""

from __future__ import annotations

import base64
import html

from qlora_requant.eval import plots
from qlora_requant.eval.compare import BASELINE, model_label
from qlora_requant.eval.schema import ModelScores, Protocol, Report, Variant
from qlora_requant.eval.statistics import no_interval

TOP = 5  # rows shown per "where the loss comes from" table


def interval_text(interval: tuple[float, float] | None, count: int, unit: str, spec: str, suffix: str = "") -> str:
    """An interval as 'low..high' (each formatted with `spec`, then `suffix`), or why there is none: too few of the
    `count` windows or samples (`unit`), or a degenerate bootstrap."""
    if interval is None:
        return no_interval(count, unit)
    low, high = interval
    return f"{low:{spec}}{suffix}..{high:{spec}}{suffix}"


def model_table(models: dict[str, ModelScores]) -> list[list[str]]:
    """Rows of the quality table: header first."""
    rows = [["model", "what it is", "PPL", "vs baseline (95% CI)", "KL (nats/token)", "top-1 agree"]]
    for name, row in models.items():
        if name == BASELINE:
            rows.append([name, model_label(name), f"{row.ppl:.3f}", "reference", "", ""])
            continue
        interval = interval_text(row.delta_pct_ci95, row.windows, "window", "+.2f", "%")
        rows.append(
            [
                name,
                model_label(name),
                f"{row.ppl:.3f}",
                f"{row.delta_pct:+.2f}% ({interval})",
                f"{row.kl:#.3g}",
                f"{row.top1_agreement:.2%}",
            ]
        )
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


def release_variant(report: Report) -> Variant:
    """The variant the headline and the gate are about: the release candidate, else the one closest to passing."""
    chosen = report.release_candidate or report.closest_variant
    return next((v for v in report.variants if v.name == chosen), report.variants[0])


def summary_lines(report: Report) -> list[str]:
    """The headline findings in words, shared by the console, report.md and report.html."""
    models, gate, release = report.models, report.gate, release_variant(report)
    gptq = models[release.model]
    interval = interval_text(gptq.delta_pct_ci95, gptq.windows, "window", "+.3f", "%")
    lines = [
        f"Adapter gain on the eval data: PPL {models['base_nf4'].ppl:.3f} (NF4 base alone) -> "
        f"{models['baseline'].ppl:.3f} (with adapter), {report.adapter_ppl_change_pct:+.2f}%.",
        *(
            [f"Merge: {models['merged'].delta_pct:+.3f}% PPL against the separate adapter."]
            if "merged" in models
            else []
        ),
        f"Re-quantization: {model_label(release.model)} ({release.bits}-bit, "
        f"{'per channel' if release.group_size == -1 else f'group {release.group_size}'}) "
        f"{gptq.delta_pct:+.3f}% PPL ({'95% CI ' if gptq.delta_pct_ci95 else ''}{interval}), "
        f"KL {gptq.kl:#.3g} nats/token, top-1 agreement {gptq.top1_agreement:.2%} against the separate "
        "adapter.",
    ]
    if len(report.variants) > 1:
        lines.append(
            f"Variants: {len(report.variants)} scored; release candidate (smallest passing every gate): "
            + (f"{release.name} ({release.size_bytes / 1e6:.3f} MB)." if report.release_candidate else "none.")
        )
    if gate.enabled and len(report.variants) > 1:
        lines += [f"  {variant_verdict(v)}" for v in report.variants]
    if gate.enabled and not gate.passed and len(report.variants) > 1:
        lines.append(
            f"Release gate: FAIL: no variant passes every gate; the closest, {release.name}, lacks: {gate.message}."
        )
    elif gate.enabled:
        lines.append(f"Release gate: {'PASS' if gate.passed else 'FAIL'}: {gate.message}.")
    else:
        lines.append(
            "Release gate: none configured (set gate.max_ppl_increase_pct, gate.max_kl or gate.min_top1_agreement)."
        )
    return lines + [f"Warning: {warning}" for warning in report.warnings]


def variant_verdict(variant: Variant) -> str:
    """One variant's gates in a line: which pass, or how far each failing one is from its limit."""
    checks = variant.gate.checks
    if variant.gates_passed:
        return f"{variant.name}: passes every gate ({', '.join(check.name for check in checks)})."
    failed = [check for check in checks if not check.passed]
    return f"{variant.name}: FAILS {len(failed)} of {len(checks)} gates: {variant.gate.message}."


def task_table(report: Report) -> list[list[str]]:
    """Every task's score per model and its change against the baseline: header first."""
    rows = [["task", "metric", "samples", "model", "score", "vs baseline, points (95% CI)", "McNemar p"]]
    for task, result in report.tasks.items():
        for name, score in result.models.items():
            change = "reference"
            if score.delta is not None:
                change = f"{score.delta:+.2f} ({interval_text(score.delta_ci95, result.samples, 'sample', '+.2f')})"
            p = "" if score.mcnemar_p is None else f"{score.mcnemar_p:.3g}"
            rows.append([task, result.metric, str(result.samples), name, f"{score.value:.4f}", change, p])
    return rows


def variant_table(variants: list[Variant], windows: int) -> list[list[str]]:
    """Size against quality of every GPTQ variant, scored on `windows` windows: header first."""
    rows = [["variant", "bits", "group", "act-order", "sym", "GPTAQ", "MB", "PPL", "vs baseline (95% CI)", "KL"]]
    rows[0] += ["top-1 agree", "gates", "serves on"]
    for v in variants:
        rows.append(
            [
                v.name,
                str(v.bits),
                "channel" if v.group_size == -1 else str(v.group_size),
                "yes" if v.desc_act else "no",
                "yes" if v.sym else "no",
                "yes" if v.gptaq else "no",
                f"{v.size_bytes / 1e6:.3f}",
                f"{v.ppl:.3f}",
                f"{v.delta_pct:+.2f}% ({interval_text(v.delta_pct_ci95, windows, 'window', '+.2f', '%')})",
                f"{v.kl:#.3g}",
                f"{v.top1_agreement:.2%}",
                "pass" if v.gates_passed else "FAIL",
                ", ".join(v.serves_on),
            ]
        )
    return rows


# What the scored tokens of chat data are, by the protocol's assistant_tokens (see quant/chat.py).
ASSISTANT_TOKENS = {
    "generation blocks": "the assistant tokens the chat template's {% generation %} blocks mark (as TRL's "
    "assistant-only loss trains them)",
    "assistant turns": "the assistant turns' tokens, each turn from the generation prompt through its closing tokens "
    "(the chat template marks none)",
}


def protocol_text(protocol: Protocol) -> str:
    """How the models were scored, in one paragraph."""
    if protocol.kind == "conversations":
        assistant = ASSISTANT_TOKENS.get(protocol.assistant_tokens, "the assistant turns' tokens")  # older runs: none
        scored = assistant if protocol.score == "assistant" else "every token"
        return (
            f"All models scored on the same {protocol.windows} conversations from `{protocol.text}`, each rendered "
            f"with the fine-tune's chat template (up to {protocol.seq_len} tokens), scoring {scored}: "
            f"{protocol.tokens} scored tokens each. " + _baseline_text(protocol)
        )
    if protocol.stride:
        windows = (
            f"{protocol.windows} sliding windows of {protocol.seq_len} tokens every "
            f"{protocol.stride} tokens (after the first window, only the {protocol.stride} new tokens "
            "of each are scored)"
        )
    else:
        windows = f"{protocol.windows} non-overlapping windows of {protocol.seq_len} tokens"
    bos = "a BOS token prepended to each window" if protocol.bos else "no BOS token"
    return (
        f"All models scored on the same {windows} from `{protocol.text}`, {bos}: {protocol.tokens} "
        "scored tokens each. " + _baseline_text(protocol)
    )


def _baseline_text(protocol: Protocol) -> str:
    return (
        "The baseline is the model as trained: the base loaded in 4-bit by bitsandbytes "
        "with the training settings, the adapter applied unmerged by PEFT. KL is the mean over scored tokens "
        "of KL(baseline || model); top-1 agreement is the share of tokens where both predict the same next "
        f"token; the interval is a paired bootstrap over windows ({protocol.bootstrap_samples} resamples, "
        f"seed {protocol.seed})."
    )


def loss_source_tables(report: Report) -> list[tuple[str, list[list[str]]]]:
    """(title, rows) for where the loss comes from: GPTQ error, NF4 round trip, merge deltas."""
    sources = report.loss_sources
    tables = []
    if sources.gptq_error:
        worst = sorted(sources.gptq_error, key=lambda row: -row.loss)[:TOP]
        tables.append(
            (
                f"Largest GPTQ errors of {sources.gptq_variant or 'the release'} (gptqmodel's per-module loss)",
                [["layer", "module", "loss"]] + [[str(r.layer), r.module, f"{r.loss:.3g}"] for r in worst],
            )
        )
    for errors, title, column in (
        (sources.nf4_roundtrip_error, "Largest NF4 round-trip errors of the base", "||W_nf4 - W|| / ||W||"),
        (sources.merge_relative_change, "Largest weight changes of the merge", "||W_merged - W|| / ||W||"),
    ):
        if errors:
            worst = sorted(errors.items(), key=lambda item: -item[1])[:TOP]
            tables.append((title, [["weight", column]] + [[k, f"{v:.4f}"] for k, v in worst]))
    return tables


def generation_rows(report: Report) -> list[list[str]]:
    generations = report.generations
    names = list(generations.outputs)
    rows = [["prompt", *names]]
    for i, prompt in enumerate(generations.prompts):
        rows.append([prompt, *[generations.outputs[name][i] for name in names]])
    return rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def quality_section(report: Report, rows: list[str] | None = None) -> list[str]:
    """Markdown lines: the protocol and the quality table of every model, or of those named in `rows` (report.md,
    and the model card with its own rows)."""
    models = report.models if rows is None else {name: report.models[name] for name in rows}
    return [
        "## Quality against the model as trained",
        "",
        protocol_text(report.protocol),
        "",
        markdown_table(model_table(models)),
        "",
    ]


def render_markdown(report: Report) -> str:
    parts = [
        "# qlora-requant quality report",
        "",
        *[f"- {line}" for line in summary_lines(report)],
        "",
        *quality_section(report),
        "## GPTQ checkpoints: size against quality",
        "",
        markdown_table(variant_table(report.variants, report.protocol.windows)),
        "",
    ]
    if report.tasks:
        parts += ["## Task scores (lm-evaluation-harness)", "", markdown_table(task_table(report)), ""]
    if report.gate.checks:
        parts += ["## Release gates", "", markdown_table(gate_rows(report)), ""]
    parts += ["## Where the loss comes from", ""]
    if report.loss_sources.gptq_note:
        parts += [report.loss_sources.gptq_note, ""]
    for title, rows in loss_source_tables(report):
        parts += [f"### {title}", "", markdown_table(rows), ""]
    if report.generations.prompts:
        rows = [[_md_cell(cell) for cell in row] for row in generation_rows(report)]
        parts += ["## Greedy continuations", "", markdown_table(rows), ""]
    parts += [
        "## Artifacts",
        "",
        *[f"- {name}: `{path}`" for name, path in report.artifacts.items()],
        "",
        "## Stages",
        "",
        markdown_table(stage_rows(report)),
        "",
    ]
    return "\n".join(parts)


# How each gate's limit, value and shortfall read: (what is compared, unit scale, unit).
GATE_UNITS = {
    "max_ppl_increase_pct": ("PPL change, 95% CI upper bound", 1, "%", "percentage points"),
    "max_kl": ("mean token KL", 1, " nats", "nats"),
    "min_top1_agreement": ("top-1 agreement, at least", 100, "%", "percentage points"),
    "max_task_drop": ("task score drop, 95% CI largest", 1, " points", "points"),
}


def gate_rows(report: Report) -> list[list[str]]:
    """Every gate judged on every variant: its limit, the measured value and the verdict, with the shortfall in the
    gate's own unit (percentage points, nats, points): header first."""
    rows = [["variant", "gate", "compares", "limit", "value", "result"]]
    for variant in report.variants:
        for check in variant.gate.checks:
            what, scale, unit, shortfall = GATE_UNITS[check.name]
            value = "no interval" if check.value is None else f"{check.value * scale:.4g}{unit}"
            result = "pass" if check.passed else "FAIL"
            if not check.passed and check.value is not None:
                result += f" by {abs(check.value - check.limit) * scale:.3g} {shortfall}"
            rows.append([variant.name, check.name, what, f"{check.limit * scale:g}{unit}", value, result])
    return rows


def stage_rows(report: Report) -> list[list[str]]:
    return [["stage", "seconds", "RSS at start (MB)", "peak RSS (MB)"]] + [
        [
            name,
            f"{stage.seconds:.1f}",
            "" if stage.rss_start_mb is None else f"{stage.rss_start_mb:.0f}",
            f"{stage.peak_rss_mb:.0f}",
        ]
        for name, stage in report.stages.items()
    ]


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_plots(report: Report, results: dict) -> dict[str, bytes]:
    """The report's plots by title; per-window data comes from the evaluation's results.json."""
    ppl_limit = next((c.limit for c in report.gate.checks if c.name == "max_ppl_increase_pct"), None)
    compared = [name for name in report.models if name.startswith(("merged", "gptq"))]
    figures = {
        "PPL change with 95% intervals": plots.ppl_change_with_intervals(report.models, compared, ppl_limit),
        "Per-window NLL difference against the baseline": plots.window_nll_differences(results["models"], compared),
    }
    if report.tasks:
        drop = report.config.get("gate", {}).get("max_task_drop")
        figures["Task score change with 95% intervals"] = plots.task_changes(
            report.tasks, drop if isinstance(drop, (int, float)) else None
        )
    if len(report.variants) > 1:
        figures["GPTQ variants: size against PPL change"] = plots.size_against_quality(
            report.variants, report.release_candidate, ppl_limit
        )
    sources = report.loss_sources
    if sources.gptq_error:
        figures["GPTQ error per layer"] = plots.gptq_error_by_layer(sources.gptq_error, sources.gptq_variant)
    return figures


def render_html(report: Report, figures: dict[str, bytes]) -> str:
    """One self-contained page: tables, and the plots embedded as PNG data."""
    gate = report.gate
    verdict = "no gate" if not gate.enabled else "PASS" if gate.passed else "FAIL"
    sections = [
        f"<h1>qlora-requant quality report: <span class='{verdict.split()[0].lower()}'>{verdict}</span></h1>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(report)) + "</ul>",
        "<h2>Quality against the model as trained</h2>",
        f"<p>{html.escape(protocol_text(report.protocol))}</p>",
        _html_table(model_table(report.models)),
        "<h2>GPTQ checkpoints: size against quality</h2>",
        _html_table(variant_table(report.variants, report.protocol.windows)),
    ]
    if report.tasks:
        sections += ["<h2>Task scores (lm-evaluation-harness)</h2>", _html_table(task_table(report))]
    for title, png in figures.items():
        data = base64.b64encode(png).decode()
        sections.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    if report.gate.checks:
        sections += ["<h2>Release gates</h2>", _html_table(gate_rows(report))]
    sections.append("<h2>Where the loss comes from</h2>")
    if report.loss_sources.gptq_note:
        sections.append(f"<p>{html.escape(report.loss_sources.gptq_note)}</p>")
    for title, rows in loss_source_tables(report):
        sections += [f"<h3>{html.escape(title)}</h3>", _html_table(rows)]
    if report.generations.prompts:
        sections += ["<h2>Greedy continuations</h2>", _html_table(generation_rows(report))]
    artifacts = "".join(
        f"<li>{html.escape(name)}: <code>{html.escape(path)}</code></li>" for name, path in report.artifacts.items()
    )
    sections += ["<h2>Artifacts</h2>", f"<ul>{artifacts}</ul>", "<h2>Stages</h2>", _html_table(stage_rows(report))]
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left;vertical-align:top}.pass{color:#1a7f37}.fail{color:#c62828}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qlora-requant report</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )


def render_reports(report: Report, results: dict) -> tuple[str, str, str]:
    """The text of report.json, report.md and report.html."""
    return report.to_json(), render_markdown(report), render_html(report, report_plots(report, results))
