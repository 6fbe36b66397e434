"""Evaluation at release scale: a wide vocabulary under a file-size limit, models placed by accelerate with disk
offload, and the scheduler examples."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from qlora_requant.pipeline.cli import EXIT_OK, main

from support import random_adapter, save_model, started_and_skipped, tiny_llama, write_config

REPO = Path(__file__).resolve().parents[1]


def test_a_wide_vocabulary_is_scored_under_a_file_size_limit_far_below_the_full_distributions(
    tmp_path, tokenizer, text_files
):
    """vocab 65536, hidden 64: the full next-token distributions of 20 windows of 128 tokens would take 666 MB; the
    compact reference takes 650 KB, and the run finishes with files limited to 200 MB."""
    base = save_model(
        tiny_llama(tokenizer, vocab_size=65536, hidden_size=64, intermediate_size=128), tokenizer, tmp_path / "base"
    )
    adapter = random_adapter(base, tmp_path / "adapter")
    config = write_config(
        tmp_path / "run.yaml",
        base,
        adapter,
        text_files,
        tmp_path / "run",
        evaluation={"text": {"path": str(text_files["eval"])}, "seq_len": 128, "max_windows": 20},
    )
    limit = 200 * 10**6
    assert 20 * 127 * 65536 * 4 > 3 * limit  # what the full distributions would need
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from qlora_requant.pipeline.cli import main
        sys.exit(main(["run", {str(config)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["protocol"]["tokens"] == 20 * 127 and report["models"]["gptq"]["kl"] > 0


PLACED = r"""
import json, sys, torch
from pathlib import Path
from qlora_requant.eval.models import Placement, load_plain, placed
from qlora_requant.eval.perplexity import eval_windows, score_windows
from qlora_requant.pipeline.metrics import measure
model_dir, folder, auto = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "auto"
placement = Placement("cpu", auto, {"cpu": 24 * 2**20} if auto else None, folder / "offload")
windows = eval_windows(torch.arange(5000) % 512, seq_len=64, max_windows=16)
with measure() as loading:  # peaks from here on, after the imports: loading, then scoring
    model = load_plain(model_dir, placement, torch.float32)
    with measure() as scoring:
        nll = score_windows(model, windows, 4)["nll"]
growth = {"total": loading["peak_rss_mb"] - loading["rss_start_mb"]}
growth["scoring"] = scoring["peak_rss_mb"] - scoring["rss_start_mb"]
print(json.dumps({"nll": nll, "placement": placed(model, placement), "rss_growth_mb": growth}))
"""


def test_a_model_larger_than_max_memory_is_scored_from_disk_with_the_same_nll(tmp_path, tokenizer):
    """A 94 MiB model under max_memory {cpu: 24 MiB}: accelerate offloads its layers to disk, and the NLL is the
    one computed in memory."""
    model = tiny_llama(tokenizer, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)
    model_dir = save_model(model, tokenizer, tmp_path / "model", dtype=torch.float32)
    size_mb = sum(path.stat().st_size for path in model_dir.glob("*.safetensors")) / 2**20
    assert size_mb > 3.5 * 24
    runs = {}
    for mode in ("memory", "auto"):
        done = subprocess.run(
            [sys.executable, "-c", PLACED, str(model_dir), str(tmp_path / mode), mode],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["auto"]["nll"] == runs["memory"]["nll"]
    assert (
        runs["memory"]["placement"] == {"cpu": 1}
        and runs["auto"]["placement"]["disk"] > runs["auto"]["placement"]["cpu"]
    )
    # Memory: loading and scoring in memory grew the process by ~250 MB, offloaded by 166-216 MB, of which scoring
    # 80 MB; accelerate reads offloaded layers through memory maps, whose pages count as resident (reclaimable),
    # so RSS is no exact bound here and is not asserted.
    assert runs["memory"]["rss_growth_mb"]["total"] > size_mb


def test_a_run_with_accelerate_placement_records_where_each_model_ran(tmp_path, tiny_base, tiny_adapter, text_files):
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
            "device_map": "auto",
            "max_memory": {"cpu": "1MB"},
        },
    )
    assert main(["run", str(config), "--set", "evaluation.models=[gptq]"]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["models"]) == ["base_nf4", "baseline", "gptq"]  # the merged model was not scored
    log = (tmp_path / "run" / "run.log").read_text()
    assert main(["run", str(config)]) == EXIT_OK
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "disk" in report["models"]["merged"]["placement"]
    # adding a model to evaluation.models scores that model alone
    assert started_and_skipped((tmp_path / "run" / "run.log").read_text()[len(log) :])[0] == ["score_merged"]
    evaluation = tmp_path / "run" / "evaluation"
    assert sorted(p.name for p in evaluation.rglob(".*")) == []  # no offload folder or partial output left


def test_the_scheduler_examples_run_as_written(tmp_path, tiny_base, tiny_adapter, text_files):
    """examples/slurm.sh with sbatch recording what it queues: its validate runs for real, the two queued steps
    (CPU merge, then GPU stages after it) run one after the other to a report; the Kubernetes Job's validate and
    run commands then find every stage complete."""
    import shlex

    import yaml

    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" "" >> {tmp_path}/queued\necho 4242\n')  # an arg a line
    stub.chmod(0o755)
    path = f"{stub.parent}:/usr/bin:/bin"
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm.sh"), str(config)],
        capture_output=True,
        text=True,
        env={"PATH": path, "HOME": str(tmp_path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "valid" in done.stdout and not (tmp_path / "run").exists()  # validated, nothing run yet
    jobs = [job.splitlines() for job in (tmp_path / "queued").read_text().split("\n\n") if job.strip()]
    assert len(jobs) == 2 and "--dependency=afterok:4242" in jobs[1] and "--gres=gpu:1" in jobs[1]
    for job in jobs:
        wrapped = shlex.split(job[job.index("--wrap") + 1])
        step = subprocess.run(wrapped, capture_output=True, text=True, timeout=600)
        assert step.returncode == EXIT_OK, step.stderr[-2000:]
    assert (tmp_path / "run" / "report.json").is_file()

    job = yaml.safe_load((REPO / "examples" / "kubernetes-job.yaml").read_text())["spec"]["template"]["spec"]
    for container in (*job["initContainers"], *job["containers"]):
        command = [str(REPO / arg) if arg.startswith(".venv/") else arg for arg in container["command"]]
        command = [str(config) if arg == "/data/configs/release.yaml" else arg for arg in command]
        step = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert step.returncode == EXIT_OK, step.stderr[-2000:]
    assert "skipped, complete and unchanged" in step.stderr
