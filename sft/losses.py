"""The SFT losses (DESIGN section 4): L = InfoNCE(disc) + InfoNCE(gen) + CE(assistant turn), and
optionally w * cross-mode InfoNCE, which puts the two embeddings in one space.

InfoNCE uses in-batch negatives gathered from every data-parallel rank *with* gradient, and is
symmetric (query -> target and target -> query). Each rank's loss covers its own rows against all
candidates; averaging gradients over ranks (FSDP/DDP do) then gives the gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Every rank's rows (of `group`, default: the world), in rank order, differentiable; and where
    this rank's rows start. Ranks must hold the same number of rows (the samplers guarantee it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    return torch.cat(all_gather(x.contiguous(), group=group)), dist.get_rank(group) * x.shape[0]


def info_nce(
    query: torch.Tensor, target: torch.Tensor, temperature: float, symmetric: bool = True, group=None
) -> torch.Tensor:
    """Mean over this rank's pairs of -log softmax(q_i . t_j / tau)[i] over all targets j of all ranks
    (eq. 1 / 2), plus the same from the targets' side when symmetric (the two directions averaged).
    Inputs are L2-normalised (B, D) embeddings of this rank's pairs, row i of each forming a pair;
    `group` is the data-parallel group (default: the world)."""
    all_query, offset = gather_with_grad(query, group)
    all_target, _ = gather_with_grad(target, group)
    labels = torch.arange(query.shape[0], device=query.device) + offset
    loss = F.cross_entropy(query @ all_target.T / temperature, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(target @ all_query.T / temperature, labels)) / 2
    return loss


def cross_mode_nce(
    query_disc: torch.Tensor,
    query_gen: torch.Tensor,
    target_disc: torch.Tensor,
    target_gen: torch.Tensor,
    temperature: float,
    group=None,
) -> torch.Tensor:
    """InfoNCE of generative queries against discriminative targets, and of discriminative queries
    against generative targets, averaged: trained with it, a query embedded one way retrieves targets
    embedded the other way (index offline with generative embeddings, query online with discriminative)."""
    return (
        info_nce(query_gen, target_disc, temperature, group=group)
        + info_nce(query_disc, target_gen, temperature, group=group)
    ) / 2


def token_nll(log_probs: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """Sum of -log p over the masked (assistant) tokens, divided by `num_tokens`: the number of such
    tokens in the whole step on this rank, so chunks of a step add up to the step's token mean."""
    return -(log_probs * mask).sum() / max(num_tokens, 1.0)
