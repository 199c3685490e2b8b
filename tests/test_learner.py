"""The learner worker in this process (one gloo rank, no Ray): forward outputs, GRPO advantages, and
that one update moves log-probs in the direction of the advantages."""

from __future__ import annotations

import torch
from verl.trainer.ppo.core_algos import kl_penalty

from ume_r1.data import Side
from ume_r1.processor import UMEProcessor
from ume_r1.trainer import build_sequences, grpo_advantages


def reference_advantages(rewards: list[float], groups: list[int], eps: float = 1e-6) -> list[float]:
    """(r - mean) / (unbiased std + eps) within each group, written out."""
    out = []
    for r, g in zip(rewards, groups, strict=True):
        members = [x for x, h in zip(rewards, groups, strict=True) if h == g]
        mean = sum(members) / len(members)
        std = (sum((x - mean) ** 2 for x in members) / (len(members) - 1)) ** 0.5
        out.append((r - mean) / (std + eps))
    return out


def test_grpo_advantages_match_reference():
    rewards = torch.tensor([0.3, -0.1, 0.9, 0.0, 1.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[0, 3:] = 0  # ragged responses: the advantage covers exactly the response tokens
    adv = grpo_advantages(rewards, mask, groups)
    expected = torch.tensor(reference_advantages(rewards.tolist(), groups.tolist()))
    torch.testing.assert_close(adv[:, 0], expected)
    assert torch.equal(adv[0, 3:], torch.zeros(2))
    assert torch.allclose(adv[1], adv[1, :1].expand(5))


def test_update_follows_the_advantages(learner, tiny_model_dir):
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    prompts = [processor.encode(Side(text="a red circle")), processor.encode(Side(text="a blue star"))]
    tok = processor.tokenizer
    # Disjoint token sets, so one response's update does not drag another along through shared rows.
    answers = [
        "<think>red round</think><answer>red circle<gen_emb>",
        "yellow purple",
        "green square",
        "<think>blue</think><answer>star<gen_emb>",
    ]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    responses = [[ids[0], ids[1]], [ids[2], ids[3]]]
    data, prompt_index = build_sequences(prompts, responses, processor.pad_id)

    first = learner.compute_log_prob(data)
    assert first.batch["embeddings"].shape == (4, 64)
    assert first.batch["has_gen_emb"].tolist() == [True, False, False, True]
    data.union(first)
    data.union(learner.compute_ref_log_prob(data))
    torch.testing.assert_close(data.batch["ref_log_prob"], data.batch["old_log_probs"])

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    data.batch["advantages"] = grpo_advantages(rewards, data.batch["response_mask"], prompt_index)
    data.meta_info["seed"] = 0
    metrics = learner.update_actor(data).meta_info["metrics"]
    assert metrics["actor/pg_loss"] != 0 and metrics["actor/grad_norm"] > 0

    after = learner.compute_log_prob(data)
    mask = data.batch["response_mask"].float()
    before_seq = (data.batch["old_log_probs"] * mask).sum(1)
    after_seq = (after.batch["old_log_probs"] * mask).sum(1)
    gained = after_seq - before_seq
    assert gained[0] > 0 and gained[3] > 0, gained
    assert gained[1] < 0 and gained[2] < 0, gained
    kl = kl_penalty(after.batch["old_log_probs"], data.batch["ref_log_prob"], "low_var_kl")
    assert float((kl * mask).sum()) > 0
