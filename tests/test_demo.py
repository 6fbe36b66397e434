"""The offline demo, as `make demo` runs it: the fixture (built once, cached in runs/), then every stage."""

from __future__ import annotations

import json
import subprocess
import sys

from support import validate_report


def test_the_demo_runs_offline_and_its_report_follows_the_schema(tmp_path):
    run_dir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "qlora_requant.pipeline.cli", "demo", "--set", f"output_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    validate_report(run_dir / "report.json")
    report = json.loads((run_dir / "report.json").read_text())
    models = report["models"]
    assert list(models) == ["base_nf4", "baseline", "merged", "gptq"]
    # The fixture's adapter is a real fine-tune: it lowers the PPL of held-out docstrings by a third or more.
    assert report["adapter_ppl_change_pct"] < -30
    assert abs(models["merged"]["delta_pct"]) < 0.1 and models["merged"]["top1_agreement"] > 0.99
    assert 0.2 < models["gptq"]["delta_pct"] < 3 and models["gptq"]["kl"] < 0.05
    assert report["gate"]["passed"] and report["gate"]["failed"] == []
    table = done.stdout.strip().split("\n\n")[0].splitlines()
    assert table[0].split() == [
        "model",
        "what",
        "it",
        "is",
        "PPL",
        "vs",
        "baseline",
        "(95%",
        "CI)",
        "KL",
        "(nats/token)",
        "top-1",
        "agree",
    ]
    assert [row.split()[0] for row in table[2:]] == list(models)
    assert f"{models['gptq']['ppl']:.3f}" in table[-1]
