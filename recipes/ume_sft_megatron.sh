#!/usr/bin/env bash
# Cold-start SFT of UME-R1 on megatron-core (needs CUDA GPUs and the `megatron` extra).
#   NPROC=8 bash recipes/ume_sft_megatron.sh model.path=... data.train_files=... \
#       megatron.tensor_model_parallel_size=2 [key=value ...]
# Every argument is an override of configs/sft.yaml; data-parallel size = NPROC / TP. PP must be 1.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for any torchrun job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec "$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29511}" \
    -m sft.megatron.train "$@"
