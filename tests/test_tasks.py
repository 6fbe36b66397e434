"""Task accuracy through lm-evaluation-harness: our path equals lm-eval's own, the paired interval and McNemar's
test, and a task drop beyond the gate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qlora_requant.eval.statistics import bootstrap_mean_difference, mcnemar_exact
from qlora_requant.eval.tasks import score_tasks
from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, main
from qlora_requant.pipeline.config import TaskSection

from support import validate_report, write_config

TASK = """task: first_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: first_words.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{text}}\\nIts first word:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, corpus) -> Path:
    """A local task: which of four words a docstring starts with (its first 200 characters)."""
    folder = tmp_path_factory.mktemp("task") / "first_words"
    folder.mkdir()
    rng = random.Random(0)
    docs = corpus["eval"][:40]
    words = sorted({doc.split()[0] for doc in corpus["eval"]})
    with (folder / "first_words.jsonl").open("w") as file:
        for doc in docs:
            first = doc.split()[0]
            choices = [first, *rng.sample([w for w in words if w != first], 3)]
            rng.shuffle(choices)
            file.write(json.dumps({"text": doc[:200], "choices": choices, "answer": choices.index(first)}) + "\n")
    (folder / "first_words.yaml").write_text(TASK)
    return folder


def test_our_path_equals_lm_evals_own_simple_evaluate(task_folder, tiny_base, monkeypatch, tmp_path):
    from lm_eval import simple_evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)  # the data file is found through the task folder, not the working directory
    section = TaskSection(path=task_folder, limit=30)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ours = score_tasks(model, AutoTokenizer.from_pretrained(tiny_base), [section], batch_size=4, seed=0)["first_words"]
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_base), "dtype": "float32"},
        device="cpu",
        tasks=[section.config()],
        limit=30,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert ours["metric"] == "acc" and len(ours["per_sample"]) == 30
    assert ours["value"] == theirs["results"]["first_words"]["acc,none"]
    samples = sorted(theirs["samples"]["first_words"], key=lambda sample: sample["doc_id"])
    assert ours["per_sample"] == [sample["acc"] for sample in samples]


def test_the_paired_interval_is_reproducible_and_mcnemar_is_exact():
    rng = random.Random(3)
    reference = [float(rng.random() < 0.6) for _ in range(200)]
    values = [r if rng.random() < 0.8 else 1 - r for r in reference]
    interval = bootstrap_mean_difference(values, reference, 1000, seed=7)
    assert interval == bootstrap_mean_difference(values, reference, 1000, seed=7)
    assert interval != bootstrap_mean_difference(values, reference, 1000, seed=8)
    delta = 100 * (sum(values) - sum(reference)) / len(values)
    assert interval[0] < delta < interval[1]
    # 1 gained, 6 lost of 7 disagreements: p = 2 * (1 + 7) / 2**7 = 0.125
    assert mcnemar_exact([1, 0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1, 1, 1]) == pytest.approx(0.125)
    assert mcnemar_exact([1, 1], [1, 1]) == 1.0 and mcnemar_exact([0.5], [1.0]) is None


def test_a_registered_task_needs_the_hub_and_is_refused_offline(
    tmp_path, tiny_base, tiny_adapter, text_files, monkeypatch, capsys
):
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(config), "--set", "evaluation.tasks=[{name: arc_easy}]"]) == EXIT_BAD_INPUT
    assert "evaluation.tasks.0.name names a hub dataset, but HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_task_drop_beyond_the_gate_exits_3_and_the_report_carries_the_tasks(
    tmp_path, tiny_base, tiny_adapter, text_files, task_folder
):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_base,
        tiny_adapter,
        text_files,
        tmp_path / "run",
        evaluation={
            "text": {"path": str(text_files["eval"])},
            "seq_len": 64,
            "max_windows": 8,
            "tasks": [{"path": str(task_folder)}],
        },
        gate={"max_task_drop": {"first_words": 0.0}},
    )
    # 2 bits: some answers change, in both directions, so the interval's lower bound is below 0 points
    assert main(["run", str(config), "--set", "requantize.bits=2"]) == EXIT_GATE_FAILED
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    validate_report(tmp_path / "run" / "report.json")
    task = report["tasks"]["first_words"]
    assert task["metric"] == "acc" and task["samples"] == 40 and list(task["models"]) == ["baseline", "merged", "gptq"]
    assert abs(task["models"]["merged"]["delta"]) <= 100 / 40 and task["models"]["gptq"]["delta_ci95"][0] < 0
    assert report["gate"]["failed"] == ["max_task_drop"]
    assert "Task scores" in (tmp_path / "run" / "report.md").read_text()
    assert main(["run", str(config), "--set", "requantize.bits=2", "--set", "gate.max_task_drop=100"]) == EXIT_OK
