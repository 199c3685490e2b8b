#!/usr/bin/env bash
# The whole UME-R1 pipeline on a CPU, from nothing to one table:
#   synthetic data -> tiny Qwen2-VL -> cold-start SFT -> evaluation -> GRPO -> evaluation.
# Environment: PYTHON (default python3), OUT (default runs/demo), PASS_K (default 8).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/demo}"
PASS_K="${PASS_K:-8}"
ART=artifacts

[ -f "$ART/synthetic/train.parquet" ] || "$PYTHON" -m ume_r1.synthetic.shapes --out "$ART/synthetic"
[ -f "$ART/synthetic_sft/sft_train.parquet" ] || "$PYTHON" -m ume_r1.synthetic.shapes_sft --out "$ART/synthetic_sft"
[ -f "$ART/tiny-qwen2-vl/config.json" ] || "$PYTHON" -m ume_r1.model.tiny --out "$ART/tiny-qwen2-vl"
[ -f "$ART/eval/eval.yaml" ] || "$PYTHON" -m ume_r1.eval.evaluate --make-synthetic-config "$ART/eval" \
    --synthetic-test "$ART/synthetic/test.parquet"

evaluate() {  # model dir, output dir
    "$PYTHON" -m ume_r1.eval.evaluate --model "$1" --config "$ART/eval/eval.yaml" --out "$2" \
        --pass-k "$PASS_K" --max-new-tokens 64 --batch-size 32 --device cpu
}

"$PYTHON" -m sft.train profile=sft_tiny model.path="$ART/tiny-qwen2-vl" output_dir="$OUT/sft" train.resume_mode=disable \
    data.train_files="$ART/synthetic_sft/sft_train.parquet" data.test_files="$ART/synthetic_sft/sft_test.parquet"
evaluate "$OUT/sft/final" "$OUT/eval_sft"
PYTHON="$PYTHON" bash recipes/ume_r1_grpo.sh profile=tiny model.path="$OUT/sft/final" \
    data.train_files="$ART/synthetic/train.parquet" trainer.default_local_dir="$OUT/grpo" trainer.resume_mode=disable \
    rollout.response_length=64
evaluate "$OUT/grpo/final" "$OUT/eval_grpo"
"$PYTHON" -m ume_r1.eval.report "$OUT/eval_sft/results.json" "$OUT/eval_grpo/results.json" --out "$OUT/summary.md"
