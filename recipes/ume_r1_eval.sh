#!/usr/bin/env bash
# Retrieval evaluation of a UME model: Hit@1 / NDCG@5 with discriminative, generative and oracle
# embeddings, plus pass@k over sampled generations. All arguments go to `python -m ume_r1.eval.evaluate`.
#   bash recipes/ume_r1_eval.sh --model DIR --config CFG.yaml --out runs/eval [--pass-k 8 --temperature 1.0]
#   bash recipes/ume_r1_eval.sh --make-synthetic-config OUT_DIR --synthetic-test data/synthetic/test.parquet
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m ume_r1.eval.evaluate "$@"
