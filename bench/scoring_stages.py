"""Benchmark: scoring N models in one process (the evaluate stage before scoring stages) against one stage per model,
each in a process of its own (reference, score_<model>): wall time and peak RSS side by side.

Builds once, in the work dir, a random-init bf16 LLaMA from merge_memory.py's generator with one decoder layer
(0.18B parameters: vocab 32k, hidden 2048), its rank-64 all-linear adapter, a byte-level tokenizer trained on the
standard library's docstrings, and a run of merge and requantize (two GPTQ variants). Then scores the four models
(baseline and base_nf4 in the reference, merged, two GPTQ) on the same windows both ways:
  (a) one process: the same stages' work run in the calling process, one model after the other, as the single
      evaluate stage did;
  (b) `qlora-requant run --stages evaluate --force evaluate`: each stage's work in a process of its own.
Each route runs in a fresh process; the figures are VmHWM (peak resident memory) and wall time.
Usage:
    .venv/bin/python bench/scoring_stages.py [--work-dir DIR] [--layers 1] [--windows 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_memory import make_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Route (a): every stage's work in this process (run_isolated replaced by a direct call), then this process's peak.
ONE_PROCESS = """
import sys
from pathlib import Path
from qlora_requant.pipeline.stages import reference, score

class Quiet:
    def say(self, text): pass
    def progress(self, *args): pass

def in_this_process(work, spec, log_file):
    return work(spec, Quiet())

for module in (reference, score):
    module.run_isolated = in_this_process
from qlora_requant.pipeline.cli import main
code = main(["run", sys.argv[1], "--stages", "evaluate", "--force", "evaluate"])
status = Path("/proc/self/status").read_text()
print("PEAK", int(status.split("VmHWM:")[1].split()[0]) / 1024)
sys.exit(code)
"""

# Route (b): the command as users run it; the stages' own peaks are in their records.
SEPARATE = """
import sys
from pathlib import Path
from qlora_requant.pipeline.cli import main
code = main(["run", sys.argv[1], "--stages", "evaluate", "--force", "evaluate"])
status = Path("/proc/self/status").read_text()
print("PEAK", int(status.split("VmHWM:")[1].split()[0]) / 1024)
sys.exit(code)
"""


def prepare(work: Path, layers: int, windows: int, stages: str = "merge,requantize", **llama) -> Path:
    """The base (`llama`: its shape's overrides), adapter, tokenizer, texts and a config whose `stages` have run;
    returns the config."""
    from qlora_requant.pipeline.demo import split_docstrings, stdlib_corpus, train_tokenizer

    sizes = make_checkpoint(work, layers, **llama)
    split = split_docstrings(list(stdlib_corpus()[1]))
    if not (work / "base" / "tokenizer.json").is_file():
        train_tokenizer(split["adapter"], vocab_size=8192).save_pretrained(work / "base")
    for part in ("calibration", "eval"):
        (work / f"{part}.txt").write_text("\n\n".join(split[part]) + "\n")
    config = {
        "output_dir": str(work / "run"),
        "device": "cpu",
        "base": {"path": str(work / "base"), "dtype": "bfloat16", "bnb": {"compute_dtype": "bfloat16"}},
        "adapter": {"path": str(work / "adapter")},
        "merge": {"dtype": "bfloat16"},
        "requantize": {
            "bits": 4,
            "group_size": 128,
            "calibration": {"path": str(work / "calibration.txt"), "n_samples": 8, "seq_len": 256},
            "variants": [{"name": "w4g128"}, {"name": "w3g128", "bits": 3}],
        },
        "evaluation": {
            "text": {"path": str(work / "eval.txt")},
            "seq_len": 256,
            "max_windows": windows,
            "batch_size": 4,
            "overlap": "warn",
        },
    }
    path = work / "run.yaml"
    path.write_text(json.dumps(config, indent=1))
    parameters = sizes["total_bytes"] // 2
    print(f"model: LLaMA, {layers} decoder layer(s), {parameters / 1e6:.0f}M parameters (bf16 base)")
    done = subprocess.run(
        [sys.executable, "-m", "qlora_requant.pipeline.cli", "run", str(path), "--stages", stages],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{stages} failed:\n{done.stderr[-3000:]}")
    return path


def route(name: str, script: str, config: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, str(config)], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"route {name} failed:\n{done.stderr[-3000:]}")
    peak = float(done.stdout.split("PEAK")[-1])
    return {"seconds": seconds, "peak_rss_mb": peak}


def stage_figures(run_dir: Path) -> list[tuple[str, dict]]:
    """Per scoring stage (from its record): wall time and its process's peak, what its model holds, and its RSS
    once the model was loaded."""
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    records = [json.loads((run_dir / "stages" / f"{name}.json").read_text()) for name in stages]
    return [
        (record["stage"], {**record["summary"]["process"], "seconds": record["measures"]["seconds"]})
        for record in records
        if record["kind"] in ("reference", "score")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-scoring")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    config = prepare(args.work_dir, args.layers, args.windows)
    shutil.rmtree(args.work_dir / "run" / "evaluation", ignore_errors=True)
    one = route("one process", ONE_PROCESS, config)
    separate = route("one process per stage", SEPARATE, config)
    print()
    print(f"{'route':<34} {'wall s':>8} {'peak RSS MB':>12}")
    print(f"{'(a) every model in one process':<34} {one['seconds']:>8.1f} {one['peak_rss_mb']:>12.0f}")
    print(f"{'(b) a process per scoring stage':<34} {separate['seconds']:>8.1f} {separate['peak_rss_mb']:>12.0f}")
    print("    (b)'s own process, which loads no model")
    print()
    print(f"{'(b) per stage':<28} {'wall s':>7} {'peak RSS MB':>12} {'model MB':>9} {'RSS loaded MB':>14}")
    for stage, figures in stage_figures(args.work_dir / "run"):
        print(
            f"{stage:<28} {figures['seconds']:>7.1f} {figures['peak_rss_mb']:>12.0f} "
            f"{figures.get('model_mb', 0):>9.0f} {figures.get('rss_after_load_mb', 0):>14.0f}"
        )


if __name__ == "__main__":
    main()
