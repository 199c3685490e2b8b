"""The torch SFT entry point end to end on the tiny model, and its checkpoint as the GRPO stage's
starting point, unconverted."""

from __future__ import annotations

import json
from pathlib import Path

import ray
from conftest import grpo_config, run_sft

from ume_r1.grpo.trainer import GRPOTrainer
from ume_r1.synthetic.shapes_sft import make_synthetic_sft


def test_sft_then_grpo(tiny_model_dir, synthetic_dir, tmp_path):
    data = make_synthetic_sft(str(tmp_path / "data"), seed=0, n_train=16, n_test=6)
    summary = run_sft(tiny_model_dir, data, tmp_path / "sft", "train.chunk_tokens=1000")
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    for key in ("format_rate", "disc_hit@1", "gen_hit@1", "chance_hit@1"):
        assert 0.0 <= summary[key] <= 1.0, key

    try:
        grpo = GRPOTrainer(
            grpo_config(
                summary["final"], synthetic_dir["train"], tmp_path / "grpo", "trainer.total_training_steps=1"
            )
        )
        final = grpo.fit()
    finally:
        ray.shutdown()
    assert (Path(final) / "model.safetensors").is_file()
