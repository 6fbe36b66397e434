"""Evaluation at release scale: a wide vocabulary under a file-size limit, models placed by accelerate with disk
offload, and the scheduler examples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import yaml

from qlora_requant.pipeline.cli import EXIT_OK, EXIT_SIGTERM, main

from support import random_adapter, same_files, save_model, started_and_skipped, tiny_llama, write_config

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "examples" / "kubernetes-job.yaml"


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


SBATCH = """#!/bin/bash
# sbatch as the examples call it: records each job's options (one a line) and answers its id
count=$(ls "{jobs}" | wc -l)
printf "%s\\n" "$@" > "{jobs}/$((4241 + count))"
echo $((4241 + count))
"""


def queued_jobs(folder: Path) -> dict[str, dict]:
    """The jobs the stub recorded, by id: their dependencies, array size, command and options."""
    jobs = {}
    for path in sorted(folder.iterdir()):
        args = path.read_text().splitlines()
        options = dict(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        dependency = options.get("--dependency", "afterok:").removeprefix("afterok:")
        first, _, last = options.get("--array", "0-0").partition("-")
        jobs[path.name] = {
            "after": set(filter(None, dependency.split(":"))),
            "tasks": range(int(first), int(last or first) + 1) if "--array" in options else [None],
            "wrap": args[args.index("--wrap") + 1],
            "args": args,
        }
    return jobs


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def test_the_slurm_job_array_scores_each_model_concurrently_to_one_runs_results_byte_for_byte(
    finished_run, tmp_path, tiny_base, tiny_adapter, text_files
):
    """examples/slurm.sh with sbatch recording what it queues; the test then plays the scheduler: every job whose
    dependencies succeeded starts, all at once, each array task with its SLURM_ARRAY_TASK_ID. One array task is
    preempted (SIGTERM) during its GPTQ and requeued: it redoes its model alone. Every file each stage wrote equals
    one uninterrupted run's, byte for byte, and so does the report but for its times and paths."""
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    (tmp_path / "jobs").mkdir()
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text(SBATCH.format(jobs=tmp_path / "jobs"))
    stub.chmod(0o755)
    environment = {"PATH": f"{stub.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm.sh"), str(config)], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "valid; 2 models, one array task each: merged gptq" in done.stdout and not (tmp_path / "run").exists()
    jobs = queued_jobs(tmp_path / "jobs")
    merge, reference, models, report = jobs  # in the order queued
    assert [jobs[job]["after"] for job in jobs] == [set(), set(), {merge, reference}, {models}]
    assert list(jobs[models]["tasks"]) == [0, 1]
    assert all("--requeue" in jobs[job]["args"] for job in (reference, models))
    assert "--gres=gpu:1" not in jobs[merge]["args"] + jobs[report]["args"]

    succeeded, console = set(), {}
    while len(succeeded) < len(jobs):
        ready = [job for job in jobs if job not in succeeded and jobs[job]["after"] <= succeeded]
        tasks = {
            (job, task): start(["bash", "-c", jobs[job]["wrap"]], {**os.environ, **_slurm_task(job, task)})
            for job in ready
            for task in jobs[job]["tasks"]
        }
        if (models, 1) in tasks:  # preempted while quantizing, then requeued
            wait_for(tmp_path / "run" / ".gptq.partial", tasks[models, 1])
            tasks[models, 1].send_signal(signal.SIGTERM)
            assert tasks[models, 1].wait() == EXIT_SIGTERM
            tasks[models, 1] = start(["bash", "-c", jobs[models]["wrap"]], {**os.environ, **_slurm_task(models, 1)})
        for key, process in tasks.items():
            _, console[key] = process.communicate(timeout=600)
            assert process.returncode == EXIT_OK, console[key][-3000:]
        succeeded |= set(ready)
    assert started_and_skipped(console[models, 0]) == (["score_merged"], [])
    assert started_and_skipped(console[models, 1]) == (["requantize", "score_gptq"], [])  # the requeued task
    assert started_and_skipped(console[report, None]) == ([], [])  # read every stage, ran none

    assert same_files(tmp_path / "run", finished_run[1])
    theirs, ours = (json.loads((run / "report.json").read_text()) for run in (finished_run[1], tmp_path / "run"))
    for volatile in ("created", "stages", "config", "output_sha256"):  # times, the config's paths; compared above
        del ours[volatile], theirs[volatile]
    assert ours == theirs


def _slurm_task(job: str, task: int | None) -> dict[str, str]:
    array = {"SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": str(task)} if task is not None else {}
    return {"SLURM_JOB_ID": job if task is None else str(int(job) + 100 + task), **array}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_the_kubernetes_indexed_jobs_pods_share_out_the_stages_to_one_runs_results(
    finished_run, tmp_path, tiny_base, tiny_adapter, text_files
):
    """The Indexed Job's pods, each given its completion index, start at once on a new run directory: each stage
    runs once, in whichever pod reaches it first (the other waits on its lock, or finds it done), each model's own
    stages in its pod. Then the report Job writes the report. The stages' files equal one run's, byte for byte."""
    config = write_config(tmp_path / "run.yaml", tiny_base, tiny_adapter, text_files, tmp_path / "run")
    steps = {doc["metadata"]["labels"]["step"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}
    models, report = steps["models"], steps["report"]
    assert models["spec"]["completionMode"] == "Indexed" and models["spec"]["completions"] >= 2

    def command(container: dict, index: int | None = None) -> list[str]:
        values = {"/data/configs/release.yaml": str(config), "$(MODEL_INDEX)": str(index)}
        return [str(REPO / arg) if arg.startswith(".venv/") else values.get(arg, arg) for arg in container["command"]]

    pod = models["spec"]["template"]["spec"]
    (validate,) = pod["initContainers"]
    assert subprocess.run(command(validate), capture_output=True, timeout=600).returncode == EXIT_OK
    (container,) = pod["containers"]
    index_source = {variable["name"]: variable for variable in container["env"]}["MODEL_INDEX"]["valueFrom"]
    assert index_source["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    pods = [start(command(container, index), {**os.environ, "JOB_COMPLETION_INDEX": str(index)}) for index in (0, 1)]
    started = []
    for process in pods:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == EXIT_OK, errors[-3000:]
        started += started_and_skipped(errors)[0]
    assert sorted(started) == ["merge", "reference", "requantize", "score_gptq", "score_merged"]  # each once
    (container,) = report["spec"]["template"]["spec"]["containers"]
    done = subprocess.run(command(container), capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_OK and "Report: " in done.stdout, done.stderr[-3000:]
    assert same_files(tmp_path / "run", finished_run[1])
