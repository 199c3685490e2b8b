"""The hybrid worker (verl's ActorRolloutRef layout): one worker per learner rank holds the FSDP
actor, the frozen reference and a rollout engine, so weights never leave the process.

- `hf`: generation runs on the actor's own module, its FSDP units unsharded for the duration (no
  copy, no sync at all; one fp32 rank holds the plain module, see `ume_r1.training.fsdp.place`).
- `vllm`: an in-process engine per rank; after each update the actor's weights go in by layer-aligned
  buckets in the engine's dtype (bf16 on GPU), trainable parameters only, and on GPU the engine's
  KV cache is freed while the learner trains (`rollout.free_cache_engine`, vLLM's sleep mode).

Every rank generates its own share of the step's prompts (data-parallel rollout).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch.distributed.fsdp import FSDPModule
from verl.single_controller.base.decorator import Dispatch, register

from ume_r1.data.processor import EncodedPrompt
from ume_r1.model.device import resolve_dtype
from ume_r1.rollout.factory import make_engine
from ume_r1.rollout.hf import HFRollout
from ume_r1.rollout.weights import SyncStats
from ume_r1.training.fsdp import gathered
from workers.learner import LearnerWorker
from workers.rollout import timed_generate


class ActorRolloutRefWorker(LearnerWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, model_path: str) -> None:
        super().init_model(model_path)
        rollout = self.config.rollout
        if rollout.name == "hf":
            if isinstance(self.policy, FSDPModule):
                self._first_forward()
            self.engine = HFRollout(
                self.policy.model, self.tokenizer, rollout, self.device, partial(gathered, self.policy)
            )
        else:
            dtype = resolve_dtype(rollout.dtype, self.device)
            self.engine = make_engine(rollout, model_path, self.device, dtype, colocated=True)

    @torch.no_grad()
    def _first_forward(self) -> None:
        """FSDP2 initialises itself on the root module's first forward; generation calls inner modules,
        so a two-token forward of the root comes first."""
        pad = self.tokenizer.pad_token_id
        ids, mask = (
            torch.full((1, 2), pad, device=self.device),
            torch.ones(1, 2, dtype=torch.long, device=self.device),
        )
        self.policy.eval()
        self.policy(ids, mask, ids[:, 1:], mask[:, 1:], with_entropy=False)

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def generate(self, prompts: list[EncodedPrompt], seed: int) -> dict:
        self.policy.eval()
        if self.config.rollout.name != "hf" and self.engine.weights_discarded:
            self._sync()  # a step without an update: the engine slept through it with no weights
        with self.peaks.stage("generate"):
            return timed_generate(self.engine, prompts, self.config.rollout.n, seed + 1000 * self.rank)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def sync_rollout(self) -> dict[str, float]:
        """Actor -> this rank's engine, in process. Nothing to do for `hf`: it reads the actor itself."""
        return self._sync()

    def _sync(self) -> dict[str, float]:
        """One engine load streaming every bucket (collective: each bucket is gathered from all ranks).
        Frozen weights go too when the engine drops its weights while asleep."""
        stats, start = SyncStats(), time.perf_counter()
        if self.config.rollout.name != "hf":
            trainable_only = not self.engine.resends_all_weights
            self.engine.load_weights(stats.stream(self.rollout_weight_buckets(trainable_only)))
        stats.seconds = time.perf_counter() - start
        return stats.metrics()
