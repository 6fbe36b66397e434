#!/bin/bash
# One qlora-requant run as Slurm jobs, every model on a GPU node of its own. The jobs share the config and the
# output_dir, on a shared file system whose locks work across nodes (NFSv4, Lustre mounted with -o flock, GPFS);
# keep `device: auto` so that each job computes on what its node has. Each job runs only its stages, waits for a
# stage another job is running, and refuses to start when a stage it reads is not complete and unchanged.
#
#   merge       CPU node: the streaming merge (it needs no GPU)
#   reference   GPU node, at the same time: the model as trained (NF4 base + adapter), scored once; every
#               model's scoring compares against it
#   models      a job array once both are done, a GPU node per model: the model's GPTQ, then its scoring
#   report      once every array task succeeded: the report and the release gate (exit 3 when it fails)
#
# A task that fails or is preempted (the GPU jobs are requeued) redoes only its own model: what it finished
# stands, and so do the other tasks' models. After a failure, run this script again: every complete stage is
# skipped. To redo one model alone: sbatch --array=INDEX with the array job's options, INDEX from `validate`.
#
#   bash examples/slurm.sh configs/my-release.yaml
set -euo pipefail
CONFIG=${1:?usage: bash examples/slurm.sh CONFIG}
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN="$(printf %q "$REPO/.venv/bin/qlora-requant") run $(printf %q "$CONFIG")"

# Every input check, here on the login node before anything is queued; the models, one a line, by array index.
MODELS=$("$REPO/.venv/bin/qlora-requant" validate "$CONFIG" --list-models)
COUNT=$(wc -l <<<"$MODELS")
echo "$CONFIG: valid; $COUNT models, one array task each: $(paste -sd' ' <<<"$MODELS")"

GPU=(--partition=gpu --gres=gpu:1 --cpus-per-task=16 --mem=200G --requeue)

MERGE=$(sbatch --parsable --job-name=qlora-merge --partition=cpu --cpus-per-task=16 --mem=200G \
  --time=04:00:00 --wrap "$RUN --stages dequantize,merge")

REFERENCE=$(sbatch --parsable --job-name=qlora-reference "${GPU[@]}" --time=06:00:00 \
  --wrap "$RUN --stages reference")

MODEL_JOBS=$(sbatch --parsable --job-name=qlora-models "${GPU[@]}" --time=12:00:00 --array=0-$((COUNT - 1)) \
  --dependency=afterok:"$MERGE:$REFERENCE" --wrap "$RUN --stages requantize,score --models \$SLURM_ARRAY_TASK_ID")

sbatch --parsable --job-name=qlora-report --partition=cpu --cpus-per-task=2 --mem=16G --time=01:00:00 \
  --dependency=afterok:"$MODEL_JOBS" --wrap "$RUN --stages report"
