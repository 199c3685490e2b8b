#!/usr/bin/env bash
# GRPO stage of UME-R1.
#   bash recipes/ume_r1_grpo.sh [key=value ...]          starts a local Ray (127.0.0.1, no dashboard)
#   ray job submit --working-dir . -- bash recipes/ume_r1_grpo.sh [key=value ...]
#                                                         runs on the cluster the job was submitted to
# Every argument is a Hydra override of configs/grpo.yaml, e.g. profile=tiny rollout.num_workers=4.
# On a cluster, model.path, data.train_files and trainer.default_local_dir must be paths every node
# can read (shared storage): the job's working directory is a temporary copy of this repo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m ume_r1.grpo.trainer "$@"
