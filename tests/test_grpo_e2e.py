"""End to end on a local Ray: two GRPO steps of the tiny profile in each layout. Steps are on-policy
(no old-log-prob forward; hf engines give the embeddings, vLLM's come from an embeddings-only forward)
except in the layouts with the group filter, which recompute the old log-probs in a forward of their
own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import grpo_config
from test_grpo_step_metrics import PROBS_DIFF_SYNCED
from transformers import Qwen2VLForConditionalGeneration

from ume_r1.grpo.trainer import GRPOTrainer

FILTERED = "algorithm.filter_groups.enable=true"
BONUS = "algorithm.reasoning_bonus_coef=0.5"  # the probe on every step, its dependence in the reward
LAYOUTS = [
    pytest.param(["rollout.num_workers=2", BONUS], id="cpu-2-rollout-workers-reasoning-bonus"),
    pytest.param(["trainer.hybrid_engine=true"], id="cpu-hybrid-hf"),
    pytest.param(["rollout.name=vllm", "trainer.hybrid_engine=true"], id="cpu-hybrid-vllm"),
    # Two ranks, each generating a different share of prompts: no collective may run while they do.
    pytest.param(
        ["trainer.hybrid_engine=true", "learner.num_workers=2", FILTERED], id="cpu-hybrid-hf-2-ranks-filtered"
    ),
    pytest.param(
        ["rollout.name=vllm", "trainer.hybrid_engine=true", "learner.num_workers=2"],
        id="cpu-hybrid-vllm-2-ranks",
    ),
    pytest.param(
        ["rollout.name=vllm", "rollout.num_workers=2", FILTERED], id="cpu-2-vllm-rollout-workers-filtered"
    ),
    pytest.param(
        ["trainer.device=cuda", "trainer.hybrid_engine=true"],
        id="cuda-hybrid-hf",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        ["trainer.device=cuda", "rollout.name=vllm", "trainer.hybrid_engine=true"],
        id="cuda-hybrid-vllm",
        marks=pytest.mark.gpu,
    ),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_grpo_steps_sync_and_checkpoint(layout, tiny_model_dir, synthetic_dir, tmp_path, shutdown_ray):
    cfg = grpo_config(
        tiny_model_dir,
        synthetic_dir["train"],
        tmp_path / "run",
        "trainer.total_training_steps=2",
        "trainer.save_hf_model=true",
        "trainer.reasoning_sensitivity_freq=2",
        "rollout.n=4",
        *layout,
    )
    trainer = GRPOTrainer(cfg)
    final = trainer.fit()

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in (
            "reward/reward",
            "reward/format",
            "reward/ranking",
            "reward/gap",
            "actor/pg_loss",
            "actor/kl_loss",
            "actor/entropy",
            "embedding/in_batch_hit@1",
            "timing_s/rollout",
            "reward/group_std",
            "reward/zero_variance_groups",
            "reward/format_variance_share",
            "training/rollout_probs_diff_mean",
        ):
            assert math.isfinite(row[key]), (key, row[key])
        # the engines hold the learner's weights: step 1 the checkpoint's, step 2 the synced update
        assert row["training/rollout_probs_diff_max"] < PROBS_DIFF_SYNCED, row[
            "training/rollout_probs_diff_max"
        ]
        assert 0 <= row["reward/zero_variance_groups"] <= 1
        # every learner stage of the step reports its peak memory; generation only where it ran there
        stages = {"forward", "update"} | ({"generate"} if trainer.hybrid else set())
        probed = row["step"] == 2 or BONUS in layout
        stages |= {"probe"} if probed else set()
        assert ("embedding/reasoning_dependence_corr/format" in row) == probed
        peaks = {k.removeprefix("perf/peak_memory_gb/") for k in row if k.startswith("perf/peak_memory_gb/")}
        assert peaks == stages and all(0 < row[f"perf/peak_memory_gb/{s}"] < 64 for s in peaks), row
        assert (0 <= row["filter/kept_rows"] <= 1) if FILTERED in layout else "filter/kept_rows" not in row
    # the probe ran at step 2 only, or on every step with the bonus (nan when no response of the random
    # model has a <think> block)
    assert ("embedding/reasoning_sensitivity" in rows[0]) == (BONUS in layout)
    probe = rows[1]["embedding/reasoning_sensitivity"]
    assert math.isnan(probe) or -1 <= probe <= 1
    # After the first update the policy has moved away from the reference.
    assert rows[1]["actor/kl_to_ref"] > 0

    learner = trainer.learners.full_state_dict()[0]
    if cfg.rollout.name == "vllm":  # (vLLM's copy is checked against the learner in test_vllm_rollout)
        trainable = sum(v.numel() * 4 for k, v in learner.items() if not k.startswith("model.visual."))
        assert rows[1]["sync/bytes"] == trainable and rows[1]["sync/buckets"] >= 1
    elif not trainer.hybrid:  # (the hybrid hf engine generates with the actor's own module)
        assert rows[1]["sync/bytes"] > 0
        for replica in trainer.rollouts.state_dict():
            assert replica.keys() == learner.keys()
            for name, tensor in learner.items():
                assert torch.equal(replica[name], tensor.to(replica[name].dtype)), name  # bf16 rollout on GPU

    load = Qwen2VLForConditionalGeneration.from_pretrained
    reloaded = load(final, local_files_only=True).state_dict()
    for name, tensor in learner.items():
        assert torch.equal(reloaded[name], tensor), name
    # The checkpoint moved away from the starting weights.
    start = load(tiny_model_dir, local_files_only=True).state_dict()
    assert any(not torch.equal(start[k], reloaded[k]) for k in start)
    assert not any(p.name.endswith(".tmp") for p in Path(final).parent.iterdir())
    # The last step's training-state checkpoint, with the HF export asked for.
    checkpoint = tmp_path / "run" / "global_step_2"
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (checkpoint / "actor" / ".metadata").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    exported = load(checkpoint / "hf", local_files_only=True).state_dict()
    assert all(torch.equal(exported[k], reloaded[k]) for k in reloaded)


def test_unknown_reward_lists_available(tiny_model_dir, synthetic_dir, tmp_path):
    cfg = grpo_config(tiny_model_dir, synthetic_dir["train"], tmp_path / "run", "reward.name=nope")
    with pytest.raises(ValueError, match=r"reward.name='nope' is unknown; available: .*'ume'"):
        GRPOTrainer(cfg)


def test_bad_row_is_named_or_skipped(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    table = pq.read_table(synthetic_dir["train"]).to_pylist()
    table[3]["query"]["images"] = [{"bytes": None, "path": "missing.png"}]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(synthetic_dir["train"]).from_pylist(table), bad)
    cfg = grpo_config(tiny_model_dir, str(bad), tmp_path / "run", "reward.name=nope")
    with pytest.raises(ValueError, match=r"bad.parquet row 3: query image 0 'missing.png'.* not found"):
        GRPOTrainer(cfg)
    # With skip, loading goes on (and stops here at the unknown reward, before any Ray work).
    cfg = grpo_config(tiny_model_dir, str(bad), tmp_path / "run", "data.on_bad_row=skip", "reward.name=nope")
    with pytest.raises(ValueError, match="reward.name='nope'"):
        GRPOTrainer(cfg)
    assert "skipped 1 of 48 rows" in capsys.readouterr().out
