"""Standalone rollout worker (scale-out): an engine of its own, placed independently of the learners.

The controller splits the unique prompts of a step across workers. After every update the learner
publishes its weights as buckets in Ray's object store (one copy per node, never through the
driver); each worker fetches them bucket by bucket into its engine.
"""

from __future__ import annotations

import time

import ray
import torch
from verl.single_controller.base.decorator import Dispatch, register

from ume_r1.data.processor import EncodedPrompt
from ume_r1.model.device import resolve_device, resolve_dtype
from ume_r1.rollout.engine import RolloutEngine, Sampled
from ume_r1.rollout.factory import make_engine
from ume_r1.rollout.weights import SyncStats
from workers.base import ConfiguredWorker


def timed_generate(engine: RolloutEngine, prompts: list[EncodedPrompt], n: int, seed: int) -> dict:
    """G = n responses per prompt, the engine's log-probs of their tokens (and embeddings, where it
    gives them), and the seconds it took (the step's `timing_s/generate`)."""
    start = time.perf_counter()
    sampled = engine.sample(prompts, n, seed) if prompts else None
    return {"sampled": sampled, "seconds": time.perf_counter() - start}


def joined_samples(results: list[dict]) -> tuple[Sampled, float]:
    """The workers' `timed_generate` results as one `Sampled`, in worker order, and the slowest
    worker's seconds. Embeddings only when every worker with prompts gave them."""
    parts = [r["sampled"] for r in results if r["sampled"] is not None]
    embedded = all(p.embeddings is not None for p in parts)
    sampled = Sampled(
        [group for p in parts for group in p.responses],
        [group for p in parts for group in p.logprobs],
        torch.cat([p.embeddings for p in parts]) if embedded else None,
        torch.cat([p.has_gen_emb for p in parts]) if embedded else None,
    )
    return sampled, max(r["seconds"] for r in results)


class RolloutWorker(ConfiguredWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, model_path: str) -> None:
        cfg = self.config
        device = resolve_device(cfg.device)
        self.engine = make_engine(cfg, model_path, device, resolve_dtype(cfg.dtype, device))

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def generate(self, prompts: list[EncodedPrompt], seed: int) -> dict:
        return timed_generate(self.engine, prompts, self.config.n, seed + 1000 * self.rank)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_weights(self, bucket_refs: list[ray.ObjectRef]) -> dict[str, float]:
        """The published buckets into the engine in one load, each fetched as the load reaches it (peak
        memory: one bucket)."""
        stats, start = SyncStats(), time.perf_counter()
        self.engine.load_weights(stats.stream(ray.get(ref) for ref in bucket_refs))
        stats.seconds = time.perf_counter() - start
        return stats.metrics()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The hf engine's weights under HF names (tests compare them with the learner's)."""
        return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}
