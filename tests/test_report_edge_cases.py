"""Too little evaluation data for an interval (one conversation): the report says so and the gates judged on an
interval fail closed; plots draw an interval from its own ends; a failed report leaves no earlier one behind."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from qlora_requant.eval import plots
from qlora_requant.eval.compare import compare_tasks, compare_to_baseline, judge_gates
from qlora_requant.eval.model_card import render_model_card
from qlora_requant.eval.report import console_table, model_table, render_html, render_markdown, report_plots
from qlora_requant.eval.schema import SCHEMA_VERSION, ModelScores, Report
from qlora_requant.eval.statistics import (
    bootstrap_mean_difference,
    bootstrap_ppl_change,
    no_interval,
    percentile_interval,
)
from qlora_requant.pipeline.cli import EXIT_GATE_FAILED, main
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.stages import report as report_stage
from qlora_requant.quant.errors import InputError

from support import chat_adapter, validate_report, write_config

# One window whose PPL change, computed as the report computes it (PPL against PPL), is 22.859946904224284% and as
# the bootstrap computes it (summed NLL) 22.85994690422426%: a one-window "interval" [x, x] that missed the estimate
# by rounding, which the plots drew as a negative error bar (matplotlib: 'xerr' must not contain negative values).
NLL, REFERENCE_NLL, TOKENS = 176.66327772875724, 163.69316044104536, 63
ONE_WINDOW = "no interval: 1 window, at least 2 needed"
GATE = {"max_ppl_increase_pct": 30.0, "min_top1_agreement": 0.5, "max_task_drop": 10.0}


def results(windows: int) -> dict:
    """Evaluation results of the four models on `windows` windows, the first being the one above."""
    reference = [REFERENCE_NLL + 3.0 * i for i in range(windows)]
    nll = {
        "base_nf4": [n * 1.3 for n in reference],
        "baseline": reference,
        "merged": [n * 1.0001 for n in reference],
        "gptq": [NLL + 3.5 * i for i in range(windows)],
    }
    return {
        "models": {
            name: {
                "window_nll": values,
                "window_tokens": [TOKENS] * windows,
                "window_kl": [0.02 * TOKENS] * windows,
                "window_top1": [0.9 * TOKENS] * windows,
            }
            for name, values in nll.items()
        }
    }


def task_results(samples: int) -> dict:
    return {
        "first_words": {
            "metric": "acc",
            "models": {
                "baseline": {"value": 1.0, "per_sample": [1.0] * samples},
                "gptq": {"value": 0.5, "per_sample": [float(i % 2) for i in range(samples)]},
            },
        }
    }


def fabricated_report(windows: int) -> tuple[Report, dict]:
    """A validated report (and its results) as the report stage assembles one, from fabricated scores."""
    scored = results(windows)
    compared = compare_to_baseline(scored["models"], 1000, 0)
    tasks = compare_tasks(task_results(windows), 1000, 0)
    gate = judge_gates(compared, GATE, "gptq", tasks)
    gptq = compared["gptq"]
    report = Report.model_validate(
        {
            "schema_version": SCHEMA_VERSION,
            "created": "2026-12-01T00:00:00+00:00",
            "device": "cpu",
            "protocol": {
                "kind": "conversations",
                "seq_len": 96,
                "stride": None,
                "bos": False,
                "score": "assistant",
                "windows": windows,
                "tokens": TOKENS * windows,
                "compute_dtype": "float32",
                "text": "eval.jsonl",
                "documents": windows,
                "bootstrap_samples": 1000,
                "seed": 0,
            },
            "models": compared,
            "adapter_ppl_change_pct": -10.0,
            "gate": gate,
            "variants": [
                {
                    "name": "gptq",
                    "model": "gptq",
                    "path": "gptq",
                    "bits": 4,
                    "group_size": 128,
                    "desc_act": False,
                    "sym": True,
                    "gptaq": False,
                    "mse": 0.0,
                    "size_bytes": 1_000_000,
                    **{key: gptq[key] for key in ("ppl", "delta_pct", "delta_pct_ci95", "kl", "top1_agreement")},
                    "gates_passed": gate["passed"],
                    "gate": gate,
                    "serves_on": {},
                }
            ],
            "release_candidate": "gptq" if gate["passed"] else None,
            "merge_base": "nf4",
            "requantize": {
                "variant": "",
                "bits": 4,
                "group_size": 128,
                "desc_act": False,
                "sym": True,
                "damp_percent": 0.01,
                "gptaq": False,
                "mse": 0.0,
                "act_group_aware": None,
                "static_groups": False,
                "calibration_windows": 16,
                "calibration_seq_len": 64,
                "calibration_format": "text",
                "fused_layers": 0,
                "kernel": "TorchAtenLinear",
                "backend": "auto",
                "check_relative_error": 0.01,
            },
            "loss_sources": {"gptq_error": [], "nf4_roundtrip_error": {}, "merge_relative_change": {"w": 0.01}},
            "generations": {"prompts": [], "max_new_tokens": 4, "outputs": {}},
            "tasks": tasks,
            "artifacts": {"merged": "merged", "gptq": "gptq"},
            "stages": {"merge": {"finished": 0.0, "seconds": 1.0, "peak_rss_mb": 100.0}},
            "output_sha256": {},
            "versions": {"qlora-requant": "0"},
            "config": {
                "base": {"path": "base"},
                "adapter": {"path": "adapter"},
                "requantize": {"calibration": {"path": "calibration.txt"}},
            },
        }
    )
    return report, scored


def test_a_paired_bootstrap_needs_two_windows_or_samples():
    assert bootstrap_ppl_change([NLL], [REFERENCE_NLL], [TOKENS], 1000, 0) is None
    assert bootstrap_mean_difference([0.0], [1.0], 1000, 0) is None
    low, high = bootstrap_ppl_change([NLL, 180.0], [REFERENCE_NLL, 170.0], [TOKENS, TOKENS], 1000, 0)
    per_window = [100 * np.expm1((n - r) / TOKENS) for n, r in ((NLL, REFERENCE_NLL), (180.0, 170.0))]
    assert (low, high) == pytest.approx(sorted(per_window))  # two windows: the interval spans both windows' change
    assert bootstrap_mean_difference([0.0, 1.0], [1.0, 1.0], 1000, 0) == (-100.0, 0.0)
    assert no_interval(1, "window") == ONE_WINDOW
    assert no_interval(0, "sample") == "no interval: 0 samples, at least 2 needed"
    assert no_interval(3, "window") == "no interval: the paired bootstrap over 3 windows is degenerate"


def test_an_interval_that_misses_its_estimate_is_no_interval():
    resampled = np.array([1.0, 1.5, 2.0] * 100)
    assert percentile_interval(resampled, 1.5, 0.95) == (1.0, 2.0)
    assert percentile_interval(resampled, 5.0, 0.95) is None
    assert percentile_interval(np.array([1.0, np.nan]), 1.0, 0.95) is None
    # no spread and an estimate summed in another order: a zero-width interval that contains it up to rounding
    assert percentile_interval(np.full(10, 22.85994690422426), 22.859946904224284, 0.95) == (22.85994690422426,) * 2


def test_gates_on_an_absent_interval_fail_closed_and_point_gates_judge_normally():
    compared = compare_to_baseline(results(1)["models"], 1000, 0)
    tasks = compare_tasks(task_results(1), 1000, 0)
    assert compared["gptq"]["delta_pct_ci95"] is None and tasks["first_words"]["models"]["gptq"]["delta_ci95"] is None
    gate = judge_gates(compared, GATE, "gptq", tasks)
    assert gate["failed"] == ["max_ppl_increase_pct", "max_task_drop"] and not gate["passed"]
    checks = {check["name"]: check for check in gate["checks"]}
    assert checks["max_ppl_increase_pct"] == {
        "name": "max_ppl_increase_pct",
        "value": None,
        "limit": 30.0,
        "passed": False,
        "message": f"GPTQ PPL change +22.86% ({ONE_WINDOW}): fails limit 30.00%, its upper bound unknown",
    }
    assert checks["max_task_drop"]["value"] is None and checks["max_task_drop"]["message"] == (
        "GPTQ first_words acc -100.00 points (no interval: 1 sample, at least 2 needed): fails limit 10.00 points, "
        "its largest drop unknown"
    )
    assert checks["min_top1_agreement"]["passed"] and checks["min_top1_agreement"]["value"] == pytest.approx(0.9)
    # with two windows the same gate is judged on the interval's upper bound: here the larger window's change
    two = judge_gates(compare_to_baseline(results(2)["models"], 1000, 0), {"max_ppl_increase_pct": 30.0})
    largest = 100 * np.expm1((NLL + 3.5 - REFERENCE_NLL - 3.0) / TOKENS)
    assert two["passed"] and two["checks"][0]["value"] == pytest.approx(largest)


def test_a_one_window_report_says_why_it_has_no_interval(tmp_path):
    report, scored = fabricated_report(1)
    path = tmp_path / "report.json"
    path.write_text(report.to_json())
    validate_report(path)
    written = json.loads(path.read_text())
    assert written["models"]["gptq"]["delta_pct_ci95"] is None and written["variants"][0]["delta_pct_ci95"] is None
    assert "delta_pct_ci95" not in written["models"]["baseline"]
    assert written["tasks"]["first_words"]["models"]["gptq"]["delta_ci95"] is None
    assert "delta_ci95" not in written["tasks"]["first_words"]["models"]["baseline"]
    assert written["gate"]["checks"][0]["value"] is None
    assert Report.model_validate_json(path.read_text()).to_json() == path.read_text()

    console = console_table(model_table(report.models))
    assert f"+22.86% ({ONE_WINDOW})" in console
    markdown = render_markdown(report)
    assert f"GPTQ (4-bit, group 128) +22.860% PPL ({ONE_WINDOW})" in markdown
    assert "| gptq | 4 | 128 | no | yes | no | 1.000 | " in markdown and f"+22.86% ({ONE_WINDOW}) |" in markdown
    assert "| first_words | acc | 1 | gptq | 0.5000 | -100.00 (no interval: 1 sample, at least 2 needed) |" in markdown
    assert "| gptq | max_ppl_increase_pct | PPL change, 95% CI upper bound | 30% | no interval | FAIL |" in markdown
    assert "Release gate: FAIL: GPTQ PPL change +22.86% (" + ONE_WINDOW + "): fails limit 30.00%" in markdown
    page = render_html(report, report_plots(report, scored))
    assert page.count(ONE_WINDOW) >= 3 and page.count("<img alt=") == 3
    assert f"+22.86% ({ONE_WINDOW})" in render_model_card(report, report.variants[0], chat=False)

    two, _ = fabricated_report(2)
    low, high = two.models["gptq"].delta_pct_ci95
    assert f"(95% CI {low:+.3f}%..{high:+.3f}%)" in render_markdown(two) and "no interval" not in render_markdown(two)


def test_plots_draw_intervals_from_their_own_ends_and_none_without_one():
    figure, axis = plt.subplots()
    assert plots.estimate_with_interval(axis, 0, 1.0, (1.5, 2.0), color="tab:red") == 2.0
    (bar,) = axis.containers[0].lines[2]
    assert bar.get_segments()[0].tolist() == [[1.5, 0.0], [2.0, 0.0]]  # the interval as it is, beside its estimate
    assert axis.lines[-1].get_xydata().tolist() == [[1.0, 0.0]]
    assert plots.estimate_with_interval(axis, 3, -1.0, None, vertical=True) == -1.0
    assert len(axis.containers) == 1 and axis.lines[-1].get_xydata().tolist() == [[3.0, -1.0]]
    plt.close(figure)

    # the one-window case that crashed: an interval [x, x] just below its estimate; and one far from it
    row = {"ppl": 2.0, "tokens": TOKENS, "windows": 1, "delta_ppl": 0.1, "kl": 0.02, "top1_agreement": 0.9}
    models = {
        "gptq": ModelScores(**row, delta_pct=22.859946904224284, delta_pct_ci95=(22.85994690422426,) * 2),
        "merged": ModelScores(**row, delta_pct=1.0, delta_pct_ci95=(1.5, 2.0)),
        "gptq_w3": ModelScores(**row, delta_pct=3.0, delta_pct_ci95=None),
    }
    assert plots.ppl_change_with_intervals(models, list(models), 3.0).startswith(b"\x89PNG")
    report, _ = fabricated_report(1)
    assert plots.size_against_quality(report.variants * 2, "gptq", None).startswith(b"\x89PNG")
    assert plots.task_changes(report.tasks).startswith(b"\x89PNG")


@pytest.fixture
def run_with_old_reports(tmp_path) -> RunLayout:
    """A run directory holding the report files and model card of an earlier report."""
    layout = RunLayout(tmp_path)
    layout.model_dir("gptq").mkdir()
    for path in old_report_files(layout):
        path.write_text("the report of earlier results")
    return layout


def old_report_files(layout: RunLayout) -> list:
    return [layout.report_file(name) for name in ("report.json", "report.md", "report.html")] + [
        layout.model_dir("gptq") / "README.md"
    ]


def test_a_failed_report_leaves_no_previous_report_behind(run_with_old_reports, monkeypatch):
    layout = run_with_old_reports

    def unreadable(_layout):
        raise InputError("the score_gptq stage has no completed record")

    monkeypatch.setattr(report_stage, "build_report", unreadable)
    with pytest.raises(InputError):
        report_stage.write_reports(layout)
    assert [path.exists() for path in old_report_files(layout)] == [False] * 4

    for path in old_report_files(layout):
        path.write_text("the report of earlier results")
    report, scored = fabricated_report(1)
    monkeypatch.setattr(report_stage, "build_report", lambda _layout: (report, scored))

    def crashing(_report, _results):
        raise ValueError("'xerr' must not contain negative values")

    with monkeypatch.context() as patch:
        patch.setattr(report_stage, "render_reports", crashing)
        with pytest.raises(ValueError, match="xerr"):
            report_stage.write_reports(layout)
    assert [path for path in old_report_files(layout) if path.exists()] == []

    assert report_stage.write_reports(layout) is report  # and once it can be built, the new report is written
    assert layout.report_file("report.json").read_text() == report.to_json()
    assert ONE_WINDOW in (layout.model_dir("gptq") / "README.md").read_text()


def test_one_conversation_runs_to_a_report_whose_interval_gate_fails_closed(
    tmp_path, tiny_base, text_files, corpus, capsys
):
    adapter = chat_adapter(tiny_base, tmp_path / "adapter", "trainable_tokens", tied=False)
    conversation = [
        {"role": "user", "content": "What does this do?"},
        {"role": "assistant", "content": corpus["eval"][0]},
    ]
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"messages": conversation}) + "\n")
    config = write_config(
        tmp_path / "run.yaml",
        tiny_base,
        adapter,
        text_files,
        tmp_path / "run",
        evaluation={
            "text": {"path": str(evaluation), "format": "chat"},
            "seq_len": 96,
            "score": "assistant",
            "prompts": ["def "],
            "max_new_tokens": 2,
        },
        gate={"max_ppl_increase_pct": 50.0, "min_top1_agreement": 0.0},
    )
    assert main(["run", str(config)]) == EXIT_GATE_FAILED
    run = tmp_path / "run"
    validate_report(run / "report.json")
    report = json.loads((run / "report.json").read_text())
    assert report["protocol"]["windows"] == 1
    assert all(report["models"][name]["delta_pct_ci95"] is None for name in ("base_nf4", "merged", "gptq"))
    checks = {check["name"]: check for check in report["gate"]["checks"]}
    assert report["gate"]["failed"] == ["max_ppl_increase_pct"] and checks["max_ppl_increase_pct"]["value"] is None
    assert checks["min_top1_agreement"]["passed"]
    assert checks["min_top1_agreement"]["value"] == report["models"]["gptq"]["top1_agreement"]
    assert ONE_WINDOW in capsys.readouterr().out
    for name in ("report.md", "report.html", "gptq/README.md"):
        assert ONE_WINDOW in (run / name).read_text(), name

    # `qlora-requant report` rebuilds it from the saved results
    for name in ("report.json", "report.md", "report.html"):
        (run / name).unlink()
    assert main(["report", str(run)]) == EXIT_GATE_FAILED
    rebuilt = json.loads((run / "report.json").read_text())
    assert {**rebuilt, "created": None} == {**report, "created": None}
    assert ONE_WINDOW in (run / "report.md").read_text()
