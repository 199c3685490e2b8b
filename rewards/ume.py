"""The UME-R1 reward (paper eq. 7): format + ranking x similarity gap, and the paper's ablations."""

from __future__ import annotations

import torch

from ume_r1.data.template import format_ok
from ume_r1.reward.batch import RewardBatch

MODES = ("ranking_x_gap", "ranking", "gap", "threshold")


def _ranking(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """|S+ ∩ top_k(S+ ∪ S-)| / k per row, k = |S+|, with ties at the cut-off going to the negatives."""
    # int32 counts: summing bool matrices straight to int64 is several times slower on CPU.
    k = pos.sum(1, dtype=torch.int32)
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros(sim.shape[0], dtype=sim.dtype, device=sim.device)
    cand = pos | neg
    # t = the k-th largest candidate; every candidate above t is in the top-k, and the remaining
    # k - above slots go to candidates equal to t, negatives first. Avoids a full per-row sort.
    top = sim.masked_fill(~cand, float("-inf")).topk(k_max, dim=1).values
    t = top.gather(1, (k - 1).clamp(min=0).long().unsqueeze(1))
    above = (cand & (sim > t)).sum(1, dtype=torch.int32)
    neg_above = (neg & (sim > t)).sum(1, dtype=torch.int32)
    neg_tied = (neg & (sim == t)).sum(1, dtype=torch.int32)
    neg_in_top = neg_above + torch.minimum(k - above, neg_tied)
    return (k - neg_in_top).to(sim.dtype) / k.clamp(min=1).to(sim.dtype)


def compute_reward(
    batch: RewardBatch,
    mode: str = "ranking_x_gap",
    in_batch_negatives: bool = True,
    symmetric: bool = True,
    threshold: float = 0.5,
    format_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per-response reward = format_weight * format + embedding reward.

    For response i of prompt p: S+ = sims with all responses of positives[p], S- = sims with all
    responses of negatives[p] (and in_batch_negatives[p] if enabled). The embedding reward is 0 when
    S+ is empty, when S- is empty (except in threshold mode) and, with symmetric=False, for targets.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; expected one of {MODES}")
    emb = batch.embeddings.float()
    device = emb.device
    prompt_of = batch.prompt_index.to(device)
    sim = emb @ emb.T
    pos_prompts = batch.prompt_mask(batch.positives)
    neg_prompts = batch.prompt_mask(batch.negatives)
    if in_batch_negatives:
        neg_prompts |= batch.prompt_mask(batch.in_batch_negatives)

    # Means via per-prompt embedding sums: sum_j e_i.e_j over a prompt's responses = e_i . sum_j e_j,
    # an (N, P) product instead of reductions over (N, N) masks.
    group_sum = torch.zeros(batch.num_prompts, emb.shape[1], device=device).index_add_(0, prompt_of, emb)
    group_size = torch.bincount(prompt_of, minlength=batch.num_prompts).to(emb.dtype)
    to_group = emb @ group_sum.T
    pos_of, neg_of = pos_prompts[prompt_of].to(emb.dtype), neg_prompts[prompt_of].to(emb.dtype)
    n_pos, n_neg = pos_of @ group_size, neg_of @ group_size
    mean_pos = (to_group * pos_of).sum(1) / n_pos.clamp(min=1)
    mean_neg = (to_group * neg_of).sum(1) / n_neg.clamp(min=1)
    rewarded = n_pos > 0
    if not symmetric:
        rewarded &= batch.role_is_query()
    # Ranking and gap are undefined without both positives and negatives; report 0 there.
    comparable = rewarded & (n_neg > 0)
    pos, neg = pos_prompts[prompt_of][:, prompt_of], neg_prompts[prompt_of][:, prompt_of]
    ranking = torch.where(comparable, _ranking(sim, pos, neg), 0.0)
    gap = torch.where(comparable, mean_pos - mean_neg, 0.0)

    if mode == "ranking_x_gap":
        embedding = ranking * gap
    elif mode == "ranking":
        embedding = ranking
    elif mode == "gap":
        embedding = gap
    else:
        embedding = (rewarded & (mean_pos > threshold)).to(sim.dtype)

    fmt = torch.tensor([float(format_ok(r)) for r in batch.responses], dtype=sim.dtype, device=device)
    return {
        "reward": format_weight * fmt + embedding,
        "format": fmt,
        "ranking": ranking,
        "gap": gap,
        "embedding": embedding,
    }
