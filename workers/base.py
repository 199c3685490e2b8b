"""The shared base of this project's Ray workers."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register

from ume_r1.training.checkpoint import rng_state, set_rng_state


class ConfiguredWorker(Worker):
    """A verl worker that holds its config group; torch uses the threads the controller granted it
    (OMP_NUM_THREADS in the worker's environment)."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        self.config = config
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_rng_state(self) -> dict:
        return rng_state()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_rng_state(self, states: list[dict]) -> None:
        """This rank's state from a checkpoint's per-rank list (wrapped round when ranks were added)."""
        set_rng_state(states[self.rank % len(states)])
