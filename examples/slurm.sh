#!/bin/bash
# Two Slurm steps of one qlora-requant run: the streaming merge on a CPU node (it needs no GPU), then GPTQ and
# the evaluation on a GPU node once the merge has succeeded. Both steps use the same config and output_dir
# (on a shared file system); each step runs only its stages and refuses to start if the stages it reads from
# are not complete and unchanged.
#
#   bash examples/slurm.sh configs/my-release.yaml
set -euo pipefail
CONFIG=${1:?usage: bash examples/slurm.sh CONFIG}
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN="$REPO/.venv/bin/qlora-requant"

"$RUN" validate "$CONFIG"   # every input check, here on the login node, before anything is queued

MERGE=$(sbatch --parsable --job-name=qlora-merge --partition=cpu --cpus-per-task=16 --mem=200G \
  --time=04:00:00 --wrap "$RUN run $CONFIG --stages merge")

sbatch --parsable --job-name=qlora-gptq-eval --dependency=afterok:"$MERGE" --partition=gpu --gres=gpu:1 \
  --cpus-per-task=16 --mem=200G --time=12:00:00 --wrap "$RUN run $CONFIG --stages requantize,evaluate"
