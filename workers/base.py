"""The shared base of this project's Ray workers."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig
from verl.single_controller.base import Worker


class ConfiguredWorker(Worker):
    """A verl worker that holds its config group; torch uses the threads the controller granted it
    (OMP_NUM_THREADS in the worker's environment)."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        self.config = config
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
