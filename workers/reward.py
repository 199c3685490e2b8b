"""Reward worker: applies the configured reward plugin (`rewards/<name>.py`) to a step's embeddings."""

from __future__ import annotations

import torch
from verl.single_controller.base.decorator import Dispatch, register

from ume_r1.reward.batch import RewardBatch
from ume_r1.reward.registry import load_reward
from workers.base import ConfiguredWorker


class RewardWorker(ConfiguredWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_reward(self) -> str:
        self.reward_fn = load_reward(self.config.name, self.config.path)
        return self.config.name

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        return self.reward_fn(batch, **dict(self.config.kwargs or {}))
