"""GRPO's step diagnostics by hand: zero-variance groups, the format share of the reward variance, in-batch
Hit@1, the within-group cosine, and the reasoning probe's dependence and its within-group correlations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_learner, scored

from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.eval.metrics import within_group_cosine
from ume_r1.grpo.advantages import flat_groups
from ume_r1.grpo.grouping import StepPrompts
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.grpo.probe import reasoning_dependence
from ume_r1.grpo.step_metrics import (
    in_batch_hit_at_1,
    reasoning_metrics,
    reward_group_stats,
    rollout_probs_diff,
    within_group_correlation,
)
from ume_r1.rollout.factory import rollout_config
from ume_r1.rollout.hf import HFRollout
from ume_r1.rollout.weights import SyncStats

# |p_engine - p_learner| of a sampled token when both hold the same weights: float order differs between
# the engine and the learner's forward, and the engine samples with the vision ids suppressed.
PROBS_DIFF_SYNCED = 2e-4


def test_flat_groups_and_reward_variance_shares() -> None:
    # 3 prompts x 2 responses: prompt 0 all equal (format and embedding), 1 differs in format only,
    # 2 in embedding only; a prompt of one response is flat by definition
    fmt = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    emb = torch.tensor([0.2, 0.2, 0.1, 0.1, 0.0, 0.4, 0.3])
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert flat_groups(fmt + emb, prompt_index).tolist() == [True, False, False, True]
    stats = reward_group_stats({"reward": fmt + emb, "format": fmt, "embedding": emb}, prompt_index)
    # population variances per prompt: format 0, .25, 0, 0; embedding 0, 0, .04, 0
    assert stats["reward/zero_variance_groups"] == 0.5
    assert stats["reward/format_variance_share"] == pytest.approx(0.25 / (0.25 + 0.04))
    assert stats["reward/group_std"] == pytest.approx((0 + 0.5 + 0.2 + 0) / 4)
    # format_weight 0.1: the format term's variances shrink 100-fold
    weighted = reward_group_stats({"reward": 0.1 * fmt + emb, "format": fmt, "embedding": emb}, prompt_index)
    assert weighted["reward/format_variance_share"] == pytest.approx(0.0025 / (0.0025 + 0.04))


def test_step_metrics_hand_computed() -> None:
    plan = StepPrompts(
        roles=["query", "target", "query", "target"], query_of_example=[0, 2], positive_of_example=[1, 3]
    )
    embeddings = torch.tensor(
        [
            [1.0, 0.0],  # query 0: nearest centre (1, 0) = its positive -> hit
            [0.6, 0.8],  # query 0: 0.6 vs 0.8 -> target 3 -> miss
            [0.8, 0.6],  # target 1: mean (0.8, 0) -> centre (1, 0)
            [0.8, -0.6],
            [0.0, 1.0],  # query 2: hit
            [-0.6, 0.8],  # query 2: -0.6 vs 0.8 -> hit
            [0.0, 1.0],  # target 3: centre (0, 1)
            [0.0, 1.0],
        ]
    )
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert in_batch_hit_at_1(embeddings, prompt_index, plan) == pytest.approx(3 / 4)
    # Pairwise cosines per prompt: 0.6, 0.64 - 0.36 = 0.28, 0.8, 1.0.
    assert within_group_cosine(embeddings, prompt_index) == pytest.approx((0.6 + 0.28 + 0.8 + 1.0) / 4)
    # A prompt with a single response has no pair and is left out of the average.
    single = torch.cat([embeddings, torch.tensor([[1.0, 0.0]])])
    assert within_group_cosine(single, torch.cat([prompt_index, torch.tensor([4])])) == pytest.approx(0.67)


def test_step_metrics_three_responses_per_group() -> None:
    # G=3: mean over the 6 ordered off-diagonal pairs.
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    s = 2**-0.5
    assert within_group_cosine(e, torch.tensor([7, 7, 7])) == pytest.approx(2 * (s + 0.0 + s) / 6)


def test_rollout_probs_diff_shows_a_skipped_sync(tiny_model_dir, synthetic_dir, single_rank):
    """The engine's probabilities of what it samples against the learner's (`rollout_probs_diff`, from
    the engine's own log-probs): near zero while both hold the same weights, large after an update the
    engine has not received, near zero again once the sync brings it."""
    learner = make_learner(tiny_model_dir, ["actor.optim.lr=1e-2"])
    config = rollout_config(name="hf", n=4, response_length=16, micro_batch_size=8, temperature=1.0)
    engine = HFRollout.load(tiny_model_dir, config, torch.device("cpu"), torch.float32)
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    prompts = [processor.encode(e.query) for e in load_examples(synthetic_dir["train"])[0][:2]]

    def diff() -> float:
        sampled = engine.sample(prompts, n=4, seed=0)
        data, _ = build_sequences(prompts, sampled.responses)
        old = learner.compute_log_prob(data).batch["old_log_probs"]
        return rollout_probs_diff(sampled.logprobs, old, data.batch["response_mask"])[
            "training/rollout_probs_diff_max"
        ]

    fresh = diff()
    data, _ = build_sequences(prompts, engine.sample(prompts, n=4, seed=1).responses)
    scored(learner, data, torch.tensor([1.0, -1.0] * 4))
    learner.update_actor(data)
    stale = diff()  # the sync skipped: the engine samples from the old weights
    engine.load_weights(SyncStats().stream(learner.rollout_weight_buckets()))
    synced = diff()
    assert fresh < PROBS_DIFF_SYNCED and synced < PROBS_DIFF_SYNCED and stale > 5 * PROBS_DIFF_SYNCED, (
        fresh,
        stale,
        synced,
    )


def test_reasoning_dependence_and_its_within_group_correlations_equal_a_direct_computation() -> None:
    """1 - cos per row (NaN where not swapped), its mean as the sensitivity, and Pearson's correlation
    of prompt-centred dependence and reward over the probed rows, against numpy."""
    gen = torch.Generator().manual_seed(0)
    own = F.normalize(torch.randn(9, 6, generator=gen), dim=-1)
    swapped = F.normalize(torch.randn(9, 6, generator=gen), dim=-1)
    valid = torch.tensor([True] * 7 + [False, True])
    dependence = reasoning_dependence(own, swapped, valid)
    direct = 1 - (own * swapped).sum(-1) / (own.norm(dim=-1) * swapped.norm(dim=-1))
    torch.testing.assert_close(dependence[valid], direct[valid])
    assert torch.isnan(dependence[~valid]).all()

    prompt_index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    reward = torch.randn(9, generator=gen)
    fmt = torch.tensor([1.0, 0, 1, 1, 1, 0, 0, 1, 1])
    x, y, f, g = (t[valid].double().numpy() for t in (dependence, reward, fmt, prompt_index))

    def centred(v: np.ndarray) -> np.ndarray:
        return v - np.array([v[g == p].mean() for p in g])

    expected = np.corrcoef(centred(x), centred(y))[0, 1]
    assert within_group_correlation(dependence, reward, prompt_index) == pytest.approx(expected)
    metrics = reasoning_metrics(dependence, {"reward": reward, "format": fmt}, prompt_index)
    assert metrics["embedding/reasoning_sensitivity"] == pytest.approx(float(1 - direct[valid].mean()))
    assert metrics["embedding/reasoning_dependence_corr/reward"] == pytest.approx(expected)
    fmt_corr = np.corrcoef(centred(x), centred(f))[0, 1]
    assert metrics["embedding/reasoning_dependence_corr/format"] == pytest.approx(fmt_corr)
    assert "embedding/reasoning_dependence_corr/embedding" not in metrics  # no such component given
    # no variation within any group: no correlation to report
    assert np.isnan(within_group_correlation(dependence, prompt_index.float(), prompt_index))
