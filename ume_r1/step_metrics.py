"""Per-step diagnostics of the generative embeddings (logged, never optimised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ume_r1.grouping import StepPrompts


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
