"""GRPO's advantages (verl core_algos) and the groups that give it no signal: a prompt whose G rewards
are all equal has zero advantages (DAPO's dynamic sampling drops such groups from the update)."""

from __future__ import annotations

import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

FLAT = 1e-6  # a group whose rewards span at most this gives GRPO no signal (a zero-variance group)


def grpo_advantages(
    rewards: torch.Tensor, response_mask: torch.Tensor, prompt_index: torch.Tensor, norm_by_std: bool = True
) -> torch.Tensor:
    """GRPO outcome advantages (verl core_algos): each response's reward, normalised within the G
    responses of its prompt, broadcast over its response tokens."""
    token_rewards = torch.zeros(response_mask.shape, dtype=torch.float32)
    last = (response_mask.sum(1) - 1).clamp(min=0)
    token_rewards[torch.arange(len(response_mask)), last] = rewards.float()
    advantages, _ = compute_grpo_outcome_advantage(
        token_rewards, response_mask, prompt_index.numpy(), norm_adv_by_std_in_grpo=norm_by_std
    )
    return advantages


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


def drop_flat_groups(data: DataProto, rewards: torch.Tensor, prompt_index: torch.Tensor) -> DataProto:
    """DAPO's dynamic-sampling filter, drop only (no new groups are sampled to refill): the rows of
    every prompt whose G rewards are all equal leave the update; their advantages were zero anyway, but
    their tokens would still count in the token mean and the KL term."""
    keep = ~flat_groups(rewards, prompt_index)[prompt_index]
    return data.select_idxs(keep.numpy())
