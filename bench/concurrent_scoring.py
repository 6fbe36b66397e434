"""Benchmark: scoring a run's models in one job, one after the other, against two concurrent jobs on the same run
directory (`--models`, as a job array's tasks do): wall time side by side, and whether the results are the same.

Builds once, in the work dir, a random-init bf16 LLaMA of about 100M parameters (merge_memory.py's generator: one
decoder layer, hidden 2048, vocab 12288), its rank-64 all-linear adapter, a byte-level tokenizer trained on the
standard library's docstrings, and a run of merge, requantize (two GPTQ variants) and the reference. Copies that
run twice, then scores its three models (merged, gptq_w4g128, gptq_w3g128):
  (a) one job: `qlora-requant run CONFIG --stages score`;
  (b) two jobs at once on one run directory: `--stages score --models 0,2` and `--models 1`, then
      `--stages report` (the dependent job that writes the report).
Compares every file the scoring stages wrote, byte for byte, and the reports but for their times and paths.
On a machine with few cores the two jobs share them, so expect little gain; on a cluster each has a node.
Usage:
    .venv/bin/python bench/concurrent_scoring.py [--work-dir DIR] [--windows 32]
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
from scoring_stages import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "qlora_requant.pipeline.cli", "run"]


def copy_run(config: Path, name: str) -> Path:
    """A copy of the prepared run directory, and its config pointing there."""
    tree = json.loads(config.read_text())
    copy = config.parent / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tree["output_dir"], copy)
    tree["output_dir"] = str(copy)
    path = config.parent / f"{name}.yaml"
    path.write_text(json.dumps(tree, indent=1))
    return path


def jobs(*commands: list[str]) -> float:
    """Run the commands at once; their wall time together."""
    started = time.perf_counter()
    running = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    for process in running:
        _, errors = process.communicate()
        if process.returncode not in (0, 3):  # 3: the release gate failed, the report is written
            raise SystemExit(f"{' '.join(process.args[3:])} failed:\n{errors[-3000:]}")
    return time.perf_counter() - started


def scoring_outputs(config: Path) -> dict[str, str]:
    """SHA-256 of every file the scoring stages wrote, from their records."""
    run_dir = Path(json.loads(config.read_text())["output_dir"])
    records = [json.loads(path.read_text()) for path in sorted((run_dir / "stages").glob("score_*.json"))]
    return {name: entry["sha256"] for record in records for name, entry in record["outputs"].items()}


def report(config: Path) -> dict:
    run_dir = Path(json.loads(config.read_text())["output_dir"])
    content = json.loads((run_dir / "report.json").read_text())
    return {key: value for key, value in content.items() if key not in ("created", "stages", "config")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-concurrent")
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    config = prepare(args.work_dir, 1, args.windows, "merge,requantize,reference", vocab_size=12288)
    one, two = copy_run(config, "one-job"), copy_run(config, "two-jobs")
    sequential = jobs([*CLI, str(one), "--stages", "score"])
    concurrent = jobs(
        [*CLI, str(two), "--stages", "score", "--models", "0,2"], [*CLI, str(two), "--stages", "score", "--models", "1"]
    )
    reporting = jobs([*CLI, str(two), "--stages", "report"])
    same_files = scoring_outputs(one) == scoring_outputs(two)
    print()
    print(f"{'scoring merged, gptq_w4g128, gptq_w3g128':<44} {'wall s':>8}")
    print(f"{'(a) one job, one model after the other':<44} {sequential:>8.1f}")
    print(f"{'(b) two concurrent jobs (--models 0,2 | 1)':<44} {concurrent:>8.1f}")
    print(f"{'    then the report job (--stages report)':<44} {reporting:>8.1f}")
    print(f"\n(b)/(a) wall time: {concurrent / sequential:.2f}")
    print(f"scoring stages' files identical, byte for byte: {same_files} ({len(scoring_outputs(two))} files)")
    print(f"reports identical but for times and paths: {report(one) == report(two)}")


if __name__ == "__main__":
    main()
