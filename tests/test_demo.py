"""The offline demo, as `make demo` runs it: the fixture (built once, cached in runs/), then every stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import validate_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`qlora-requant demo` run as make demo runs it (into a scratch output_dir): the process and the run."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "qlora_requant.pipeline.cli", "demo", "--set", f"output_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, run_dir


def test_the_demo_runs_offline_and_its_report_follows_the_schema(demo):
    done, run_dir = demo
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


def test_the_demo_releases_a_chat_model_that_stops_at_the_end_of_its_turn(demo):
    """The demo's adapter is a chat fine-tune (two added tokens, a chat template): the GPTQ release renders
    the template as the adapter's tokenizer does and, greedy, ends its answer with <|im_end|>."""
    _, run_dir = demo
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        chat = [{{"role": "user", "content": "What does sorted do?"}}]
        adapter = AutoTokenizer.from_pretrained({str(REPO / "runs" / "demo-fixture" / "adapter")!r})
        tokenizer = AutoTokenizer.from_pretrained({str(run_dir / "gptq")!r})
        model = AutoModelForCausalLM.from_pretrained({str(run_dir / "gptq")!r}, dtype=torch.float32)
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        new = model.generate(input_ids=ids, max_new_tokens=120, do_sample=False)[0, ids.shape[1]:].tolist()
        print(json.dumps({{"same_template": tokenizer.apply_chat_template(chat, tokenize=False)
                                             == adapter.apply_chat_template(chat, tokenize=False),
                          "vocabulary": len(tokenizer), "new": len(new), "last": tokenizer.decode(new[-1:])}}))
    """)
    checked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr[-2000:]
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    assert result["same_template"] and result["vocabulary"] == 1026
    assert result["new"] < 120 and result["last"] == "<|im_end|>", result
