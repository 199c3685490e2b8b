"""Per-step diagnostics of the generative embeddings (logged, never optimised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ume_r1.grouping import StepPrompts

FLAT = 1e-6  # a group whose rewards span at most this gives GRPO no signal (a zero-variance group)


def prompt_means(embeddings: torch.Tensor, prompt_index: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """One normalised embedding per prompt: the mean of its responses' embeddings."""
    sums = torch.zeros(num_prompts, embeddings.shape[1]).index_add_(0, prompt_index, embeddings)
    return F.normalize(sums, dim=-1)


def in_batch_hit_at_1(embeddings: torch.Tensor, prompt_index: torch.Tensor, plan: StepPrompts) -> float:
    """Share of query responses whose most similar target prompt (in the batch) is their positive."""
    targets = [i for i, r in enumerate(plan.roles) if r == "target"]
    centres = prompt_means(embeddings, prompt_index, len(plan.roles))[targets]
    hits, total = 0, 0
    for q, pos in zip(plan.query_of_example, plan.positive_of_example, strict=True):
        mine = embeddings[prompt_index == q]
        best = (mine @ centres.T).argmax(dim=1)
        hits += int((best == targets.index(pos)).sum())
        total += len(mine)
    return hits / max(total, 1)


def within_group_cosine(embeddings: torch.Tensor, prompt_index: torch.Tensor) -> float:
    """Mean pairwise cosine among the G embeddings of one prompt, averaged over prompts (1 = collapsed)."""
    values = []
    for p in prompt_index.unique():
        group = embeddings[prompt_index == p]
        g = len(group)
        if g > 1:
            sims = group @ group.T
            values.append(float((sims.sum() - sims.diagonal().sum()) / (g * (g - 1))))
    return sum(values) / max(len(values), 1)


def _group_variance(values: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Per prompt: the population variance of its responses' values (what GRPO's advantages see)."""
    num = int(prompt_index.max()) + 1 if len(prompt_index) else 0
    count = torch.bincount(prompt_index, minlength=num).double()
    mean = torch.zeros(num, dtype=torch.float64).index_add_(0, prompt_index, values.double()) / count.clamp(
        min=1
    )
    sq = torch.zeros(num, dtype=torch.float64).index_add_(
        0, prompt_index, (values.double() - mean[prompt_index]) ** 2
    )
    return (sq / count.clamp(min=1))[count > 0]


def flat_groups(rewards: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """(P,) bool: prompts whose responses' rewards are all equal (within FLAT): their GRPO advantages are
    zero, so they only dilute the update (DAPO's dynamic sampling drops them)."""
    num = int(prompt_index.max()) + 1
    rewards = rewards.double()
    high = torch.full((num,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, prompt_index, rewards, "amax"
    )
    low = torch.full((num,), torch.inf, dtype=torch.float64).scatter_reduce(0, prompt_index, rewards, "amin")
    return high - low <= FLAT


def reward_group_stats(scores: dict[str, torch.Tensor], prompt_index: torch.Tensor) -> dict[str, float]:
    """How much signal the step's rewards give GRPO: the mean within-group std of the reward, the share
    of groups whose G rewards are all equal (no gradient), and the weighted format term's share of the
    within-group variances of the format and embedding terms (the rest is the embedding term's)."""
    variance = _group_variance(scores["reward"], prompt_index)
    out = {
        "reward/group_std": float(variance.sqrt().mean()),
        "reward/zero_variance_groups": float(flat_groups(scores["reward"], prompt_index).double().mean()),
    }
    if "embedding" in scores:  # the format part is what the reward adds to it: format_weight * format
        fmt = float(_group_variance(scores["reward"] - scores["embedding"], prompt_index).mean())
        emb = float(_group_variance(scores["embedding"], prompt_index).mean())
        out["reward/format_variance_share"] = fmt / (fmt + emb) if fmt + emb > 0 else 0.0
    return out


def reasoning_sensitivity(embeddings: torch.Tensor, swapped: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean cosine between each response's generative embedding and that of the same response with its
    <think> text taken from another input's response (1: the reasoning does not matter), over `valid`."""
    cos = F.cosine_similarity(embeddings.float(), swapped.float(), dim=-1)
    return float(cos[valid].mean()) if bool(valid.any()) else float("nan")
