"""The offline demo, as `make demo` runs it and as a Python script runs it: the fixture (built once, cached in runs/),
then every stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qlora_requant.pipeline.cli import DEMO_FIXTURE
from qlora_requant.pipeline.demo import build_fixture

from support import same_files, validate_report

REPO = Path(__file__).resolve().parents[1]


API_SCRIPT = """
import json
import sys

import qlora_requant

report = qlora_requant.run(sys.argv[1], set={"output_dir": sys.argv[2]})  # at the top level: no guard needed
written = qlora_requant.load_report(report.run_dir)
print(json.dumps({"candidate": report.release_candidate, "passed": report.gate.passed,
                  "as_written": report.model_dump(mode="json") == written.model_dump(mode="json")}))
"""


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The demo run twice, each into a scratch output_dir (the process and the run): `cli`, as make demo runs
    it (`qlora-requant demo`), and `api`, by a user's script calling `qlora_requant.run` on configs/demo.yaml. The
    fixture is built first (cached in runs/, as make demo builds it)."""
    build_fixture(DEMO_FIXTURE)
    folder = tmp_path_factory.mktemp("demo")
    (folder / "release.py").write_text(API_SCRIPT)
    commands = {
        "cli": [sys.executable, "-m", "qlora_requant.pipeline.cli", "demo", "--set", f"output_dir={folder / 'cli'}"],
        "api": [sys.executable, str(folder / "release.py"), str(REPO / "configs" / "demo.yaml"), str(folder / "api")],
    }
    runs = {}
    for name, command in commands.items():  # one after the other: at once, on 2 cores, both take longer than in turn
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=folder)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = done, folder / name
    return runs


@pytest.fixture(scope="module")
def demo(demos) -> tuple[subprocess.CompletedProcess, Path]:
    return demos["cli"]


def test_the_demo_runs_offline_and_its_report_follows_the_schema(demo):
    done, run_dir = demo
    validate_report(run_dir / "report.json")
    report = json.loads((run_dir / "report.json").read_text())
    models = report["models"]
    variants = ["gptq_w4g128", "gptq_w4g128-gptaq", "gptq_w3g128"]
    assert list(models) == ["base_nf4", "baseline", "merged", *variants]
    assert report["protocol"]["kind"] == "conversations" and report["protocol"]["score"] == "assistant"
    # The fixture's adapter is a real fine-tune: it lowers the PPL of held-out answers by a third or more.
    assert report["adapter_ppl_change_pct"] < -30
    assert abs(models["merged"]["delta_pct"]) < 0.1 and models["merged"]["top1_agreement"] > 0.99
    # 3 bits costs more than 4 and fails the gate; of the two 4-bit checkpoints (one size), the closer one ships
    four, gptaq, three = (models[name] for name in variants)
    assert 0.2 < min(four["delta_pct"], gptaq["delta_pct"]) and max(four["kl"], gptaq["kl"]) < 0.05
    assert three["kl"] > 2 * max(four["kl"], gptaq["kl"])
    assert [v["gates_passed"] for v in report["variants"]] == [True, True, False]
    closest = min(report["variants"][:2], key=lambda v: v["kl"])["name"]
    assert report["release_candidate"] == closest and report["requantize"]["variant"] == closest
    assert report["gate"]["passed"] and report["gate"]["failed"] == []
    # the local lm-eval task, offline, for the baseline, the merged model and every variant on the same samples
    task = report["tasks"]["stdlib_names"]
    assert task["metric"] == "acc" and task["samples"] == 100
    assert list(task["models"]) == ["baseline", "merged", *variants]
    assert all(0 <= row["value"] <= 1 for row in task["models"].values())
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
    assert f"{three['ppl']:.3f}" in table[-1]
    assert f"release candidate (smallest passing every gate): {closest}" in done.stdout


def test_the_demo_releases_a_chat_model_that_stops_at_the_end_of_its_turn(demo):
    """The demo's adapter is a chat fine-tune (two added tokens, a chat template): the GPTQ release renders
    the template as the adapter's tokenizer does and, greedy, ends its answer with <|im_end|>."""
    _, run_dir = demo
    release = run_dir / f"gptq_{json.loads((run_dir / 'report.json').read_text())['release_candidate']}"
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        chat = [{{"role": "user", "content": "What does sorted do?"}}]
        adapter = AutoTokenizer.from_pretrained({str(REPO / "runs" / "demo-fixture" / "adapter")!r})
        tokenizer = AutoTokenizer.from_pretrained({str(release)!r})
        model = AutoModelForCausalLM.from_pretrained({str(release)!r}, dtype=torch.float32)
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


def test_the_demo_run_from_a_python_script_writes_the_report_the_cli_writes(demos):
    """A user's script drives the demo through `qlora_requant.run`, called at its top level (the stage processes do
    not import it again): every stage's files and the report equal the command's, but for times and paths, and the
    returned report is the one written."""
    (_, cli_run), (ran, api_run) = demos["cli"], demos["api"]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    theirs, ours = (json.loads((run / "report.json").read_text()) for run in (cli_run, api_run))
    assert result == {"candidate": theirs["release_candidate"], "passed": True, "as_written": True}
    assert same_files(api_run, cli_run)
    for volatile in ("created", "stages", "config", "output_sha256"):  # times, the config's paths; compared above
        del ours[volatile], theirs[volatile]
    assert ours == theirs
    assert ran.stderr.splitlines()[0].endswith(
        "demo.yaml: checking the inputs (base, adapter, tokenizer, data) after loading torch"
    )
