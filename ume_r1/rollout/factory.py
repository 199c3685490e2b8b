"""Building a rollout engine: the backend `rollout.name` names (`hf` or `vllm`), with the engine defaults
of configs/grpo.yaml for callers outside the Hydra entry points."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ume_r1.rollout.engine import RolloutEngine

BACKENDS = ("hf", "vllm")
GRPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "grpo.yaml"


def rollout_config(**overrides) -> DictConfig:
    """The `rollout` group of configs/grpo.yaml (the one home of the engine defaults) with `overrides`,
    for code outside the Hydra entry points: evaluation, tests, benchmarks. `device` and `seed` point
    into other groups there, so they are set here (cpu, 0; the pixel bounds of the data defaults) unless
    overridden."""
    full = OmegaConf.load(GRPO_CONFIG)
    media = OmegaConf.to_container(full.rollout.mm_processor_kwargs, resolve=True)  # from data.*
    return OmegaConf.merge(
        full.rollout, {"device": "cpu", "seed": 0, "mm_processor_kwargs": media}, overrides
    )


def make_engine(
    config, model_path: str, device: torch.device, dtype: torch.dtype, colocated: bool = False
) -> RolloutEngine:
    """The backend `config.name` names, loaded from a local HF checkpoint; `colocated`: it shares its
    device with a learner (the hybrid worker), so a vLLM engine sleeps while the learner trains."""
    if config.name == "hf":
        from ume_r1.rollout.hf import HFRollout

        return HFRollout.load(model_path, config, device, dtype)
    if config.name == "vllm":
        from ume_r1.rollout.vllm import VLLMRollout

        return VLLMRollout(model_path, config, dtype, colocated)
    raise ValueError(f"rollout.name={config.name!r} is not a known backend; available: {list(BACKENDS)}")
