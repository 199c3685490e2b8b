#!/usr/bin/env bash
# The paper's reward ablation (table 2) on a CPU, on the tasks where reasoning decides the answer
# (ume_r1.synthetic.reasoning): one cold-start SFT checkpoint, then GRPO from it with each reward
# mode over several seeds, each evaluated on the same held-out queries (512 by default), then one
# table with every reward's mean change, per-seed changes and standard errors, the paired differences
# between rewards, and a PNG of the reward curves (ume_r1.eval.ablation).
# Environment: PYTHON (default python3), OUT (runs/ablate), DATA_SEED (0: the held-out draw and the SFT
# rows; another value is a fresh draw of both), N_TEST (512); the cold start: SFT_ROWS (2048), SFT_NOISE
# (0.5), SFT_STEPS (1200: it then samples the strict format ~95% of the time at T=1, the paper's premise);
# MAIN_SEEDS ("1 2 3 4 5": ranking_x_gap), OTHER_SEEDS ("1 2": fewer seeds for the other rewards, to stay
# in budget; "" skips them), OTHER_MODES ("ranking gap threshold"), BONUS_COEF (0.1) and BONUS_SEEDS
# ("1 2 3"): ranking_x_gap with algorithm.reasoning_bonus_coef, the remedy, run as "ranking_x_gap_bonus"
# ("" skips it), STEPS (GRPO steps, 30), PASS_K (4). About 30 minutes on 2 cores with the defaults.
# A seed is trainer.seed AND data.seed: rollout sampling and the data order of the RL stage; the SFT
# checkpoint is shared by all runs. GRPO_OVERRIDES: more Hydra overrides for every GRPO run, e.g.
# GRPO_OVERRIDES="reward.kwargs.format_weight=0" (the embedding term alone).
# A run whose evaluation exists is not repeated: after a kill, the same command finishes the sweep.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/ablate}"
DATA_SEED="${DATA_SEED:-0}"
N_TEST="${N_TEST:-512}"
SFT_ROWS="${SFT_ROWS:-2048}"
SFT_NOISE="${SFT_NOISE:-0.5}"
SFT_STEPS="${SFT_STEPS:-1200}"
MAIN_SEEDS="${MAIN_SEEDS:-1 2 3 4 5}"
OTHER_SEEDS="${OTHER_SEEDS-1 2}"
OTHER_MODES="${OTHER_MODES:-ranking gap threshold}"
BONUS_COEF="${BONUS_COEF:-0.1}"
BONUS_SEEDS="${BONUS_SEEDS-1 2 3}"
STEPS="${STEPS:-30}"
PASS_K="${PASS_K:-4}"
GRPO_OVERRIDES="${GRPO_OVERRIDES:-}"
ART=artifacts
DATA="$ART/reasoning_seed${DATA_SEED}_test${N_TEST}_sft${SFT_ROWS}_noise${SFT_NOISE}"
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$OUT"
echo "main reward ranking_x_gap: seeds $MAIN_SEEDS; $OTHER_MODES: seeds ${OTHER_SEEDS:-none} (fewer, for the budget);" \
    "ranking_x_gap_bonus (coef $BONUS_COEF): seeds ${BONUS_SEEDS:-none}; $N_TEST held-out queries, data seed $DATA_SEED"

[ -f "$DATA/train.parquet" ] || "$PYTHON" -m ume_r1.synthetic.reasoning --out "$DATA" --seed "$DATA_SEED" \
    --n-test "$N_TEST" --n-sft-train "$SFT_ROWS" --sft-noise "$SFT_NOISE"
[ -f "$ART/tiny-qwen2-vl/config.json" ] || "$PYTHON" -m ume_r1.model.tiny --out "$ART/tiny-qwen2-vl"
[ -f "$DATA/eval/eval.yaml" ] || "$PYTHON" -m ume_r1.eval.evaluate --make-synthetic-config "$DATA/eval" \
    --synthetic-test "$DATA/test.parquet"

evaluate() {  # model dir, output dir
    "$PYTHON" -m ume_r1.eval.evaluate --model "$1" --config "$DATA/eval/eval.yaml" --out "$2" --pass-k "$PASS_K" \
        --pass-k-max-queries 16 --max-new-tokens 64 --batch-size 32 --device cpu > "$2.log" 2>&1
}

grpo() {  # run name, seed, reward mode, more overrides...
    local run="$1_seed$2" seed="$2" mode="$3"
    shift 3
    [ -f "$OUT/eval_$run/results.json" ] && return 0
    echo "$(date +%T) GRPO $run"
    # shellcheck disable=SC2086  # GRPO_OVERRIDES is a list of overrides
    PYTHON="$PYTHON" bash recipes/ume_r1_grpo.sh profile=tiny model.path="$OUT/sft/final" \
        data.train_files="$DATA/train.parquet" trainer.default_local_dir="$OUT/$run" trainer.resume_mode=disable \
        trainer.seed="$seed" data.seed="$seed" reward.kwargs.mode="$mode" trainer.total_training_steps="$STEPS" \
        trainer.save_freq=-1 rollout.response_length=64 "trainer.logger=[console]" "$@" $GRPO_OVERRIDES \
        > "$OUT/$run.log" 2>&1
    evaluate "$OUT/$run/final" "$OUT/eval_$run"
}

if [ ! -f "$OUT/sft/final/config.json" ]; then
    "$PYTHON" -m sft.train profile=sft_tiny model.path="$ART/tiny-qwen2-vl" output_dir="$OUT/sft" \
        train.resume_mode=disable train.total_steps="$SFT_STEPS" train.save_freq=-1 data.train_files="$DATA/sft_train.parquet" \
        data.test_files="$DATA/sft_test.parquet" > "$OUT/sft.log" 2>&1
fi
[ -f "$OUT/eval_sft/results.json" ] || evaluate "$OUT/sft/final" "$OUT/eval_sft"
for seed in $MAIN_SEEDS; do grpo ranking_x_gap "$seed" ranking_x_gap; done
for seed in $BONUS_SEEDS; do
    grpo ranking_x_gap_bonus "$seed" ranking_x_gap algorithm.reasoning_bonus_coef="$BONUS_COEF"
done
for seed in $OTHER_SEEDS; do
    for mode in $OTHER_MODES; do grpo "$mode" "$seed" "$mode"; done
done
"$PYTHON" -m ume_r1.eval.ablation "$OUT"
