"""The torch SFT entry point end to end on the tiny model, and its checkpoint as the GRPO stage's
starting point, unconverted."""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch.distributed as dist
from conftest import compose_config, grpo_config

from sft.train import train
from ume_r1.grpo.trainer import GRPOTrainer
from ume_r1.synthetic.shapes_sft import make_synthetic_sft


def test_sft_then_grpo(tiny_model_dir, synthetic_dir, tmp_path):
    data = make_synthetic_sft(str(tmp_path / "data"), seed=0, n_train=16, n_test=6)
    cfg = compose_config(
        "sft",
        "profile=sft_tiny",
        f"model.path={tiny_model_dir}",
        f"data.train_files={data['train']}",
        f"data.test_files={data['test']}",
        "train.total_steps=2",
        "train.global_batch_size=8",
        "train.chunk_size=6",
        f"output_dir={tmp_path / 'sft'}",
        "eval.max_new_tokens=8",
    )
    try:
        summary = train(cfg)
    finally:
        dist.destroy_process_group()
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
