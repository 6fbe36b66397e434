#!/bin/bash
# The demo on one GPU against the same demo on the CPU: the merged checkpoint's bytes and every model's PPL, side
# by side. Under 5 minutes on one GPU once the fixture is built (make demo builds it, on the CPU).
#
#   bash bench/gpu_check.sh            (from the repository root, after make demo)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs}
$BIN/qlora-requant demo --set output_dir="$PWD/$OUT/gpu-check-cpu" --set device=cpu > /dev/null || [ $? -eq 3 ]
$BIN/qlora-requant run configs/demo.yaml --set output_dir="$PWD/$OUT/gpu-check-cuda" --set device=cuda > /dev/null \
  || [ $? -eq 3 ]
$BIN/python - "$OUT/gpu-check-cpu" "$OUT/gpu-check-cuda" <<'PY'
import hashlib, json, sys
from pathlib import Path
cpu, cuda = (Path(p) for p in sys.argv[1:3])
def digest(run):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted((run / "merged").glob("*.safetensors"))}
print("merged safetensors identical on cpu and cuda:", digest(cpu) == digest(cuda))
reports = {name: json.loads((run / "report.json").read_text()) for name, run in (("cpu", cpu), ("cuda", cuda))}
print(f"{'model':20}{'PPL cpu':>12}{'PPL cuda':>12}{'KL cuda':>12}")
for model, row in reports["cpu"]["models"].items():
    other = reports["cuda"]["models"][model]
    print(f"{model:20}{row['ppl']:>12.4f}{other['ppl']:>12.4f}{other.get('kl', 0):>12.4g}")
for name, report in reports.items():
    stages = ", ".join(f"{stage} {record['seconds']:.0f} s" for stage, record in report["stages"].items())
    print(f"{name}: {stages}; release candidate {report['release_candidate']}")
PY
