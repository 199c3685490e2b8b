"""Example reward plugin: format + (mean similarity to positives - max similarity to negatives)."""

from __future__ import annotations

import torch

from ume_r1.data.template import format_ok
from ume_r1.reward.batch import RewardBatch


def compute_reward(batch: RewardBatch, margin_weight: float = 1.0) -> dict[str, torch.Tensor]:
    sim = batch.embeddings @ batch.embeddings.T
    pos = batch.response_mask(batch.positives)
    neg = batch.response_mask(batch.negatives) | batch.response_mask(batch.in_batch_negatives)
    mean_pos = (sim * pos).sum(1) / pos.sum(1).clamp(min=1)
    # The hardest negative; rows without negatives (or positives) get no margin term.
    max_neg = sim.masked_fill(~neg, float("-inf")).max(1).values
    has_both = pos.any(1) & neg.any(1)
    margin = torch.where(has_both, mean_pos - max_neg, 0.0)
    fmt = torch.tensor([float(format_ok(r)) for r in batch.responses], device=sim.device)
    return {"reward": fmt + margin_weight * margin, "format": fmt, "margin": margin}
