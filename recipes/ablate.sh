#!/usr/bin/env bash
# The paper's reward ablation (table 2) on a CPU, on the tasks where reasoning decides the answer
# (ume_r1.synthetic.reasoning): one cold-start SFT checkpoint, then GRPO from it with each reward
# mode over several seeds, each evaluated on the same held-out queries, then one table and a PNG of
# the reward curves (ume_r1.eval.ablation). About 35 minutes on 2 cores with the defaults.
# Environment: PYTHON (default python3), OUT (runs/ablate), SEEDS ("1 2 3"),
# MODES ("ranking_x_gap ranking gap threshold"), STEPS (GRPO steps, 30), PASS_K (4). A seed is
# trainer.seed (rollout sampling and initialisation of everything random in the RL stage); the data
# order (data.seed) and the SFT checkpoint are shared by all runs, so the runs differ only by the RL
# stage itself. GRPO_OVERRIDES: more Hydra overrides for every GRPO run, e.g.
# GRPO_OVERRIDES="reward.kwargs.format_weight=0" (the embedding term alone).
# A run whose evaluation exists is not repeated: after a kill, the same command finishes the sweep.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/ablate}"
SEEDS="${SEEDS:-1 2 3}"
MODES="${MODES:-ranking_x_gap ranking gap threshold}"
STEPS="${STEPS:-30}"
PASS_K="${PASS_K:-4}"
GRPO_OVERRIDES="${GRPO_OVERRIDES:-}"
ART=artifacts
DATA="$ART/reasoning"
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$OUT"

[ -f "$DATA/train.parquet" ] || "$PYTHON" -m ume_r1.synthetic.reasoning --out "$DATA"
[ -f "$ART/tiny-qwen2-vl/config.json" ] || "$PYTHON" -m ume_r1.model.tiny --out "$ART/tiny-qwen2-vl"
[ -f "$DATA/eval/eval.yaml" ] || "$PYTHON" -m ume_r1.eval.evaluate --make-synthetic-config "$DATA/eval" \
    --synthetic-test "$DATA/test.parquet"

evaluate() {  # model dir, output dir
    "$PYTHON" -m ume_r1.eval.evaluate --model "$1" --config "$DATA/eval/eval.yaml" --out "$2" --pass-k "$PASS_K" \
        --pass-k-max-queries 16 --max-new-tokens 64 --batch-size 32 --device cpu > "$2.log" 2>&1
}

if [ ! -f "$OUT/sft/final/config.json" ]; then
    "$PYTHON" -m sft.train profile=sft_tiny model.path="$ART/tiny-qwen2-vl" output_dir="$OUT/sft" \
        train.resume_mode=disable data.train_files="$DATA/sft_train.parquet" data.test_files="$DATA/sft_test.parquet" \
        > "$OUT/sft.log" 2>&1
fi
[ -f "$OUT/eval_sft/results.json" ] || evaluate "$OUT/sft/final" "$OUT/eval_sft"
for seed in $SEEDS; do
    for mode in $MODES; do
        run="${mode}_seed${seed}"
        [ -f "$OUT/eval_$run/results.json" ] && continue
        echo "$(date +%T) GRPO $run"
        PYTHON="$PYTHON" bash recipes/ume_r1_grpo.sh profile=tiny model.path="$OUT/sft/final" \
            data.train_files="$DATA/train.parquet" trainer.default_local_dir="$OUT/$run" trainer.resume_mode=disable \
            trainer.seed="$seed" reward.kwargs.mode="$mode" trainer.total_training_steps="$STEPS" \
            trainer.save_freq=-1 rollout.response_length=64 "trainer.logger=[console]" $GRPO_OVERRIDES \
            > "$OUT/$run.log" 2>&1
        evaluate "$OUT/$run/final" "$OUT/eval_$run"
    done
done
"$PYTHON" -m ume_r1.eval.ablation "$OUT"
