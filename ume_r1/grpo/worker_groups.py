"""How the controller puts its worker groups on Ray: join a cluster or start the locked local Ray, build a
verl worker group of one role (supervised: a lost or silent worker is an error naming it), and hand each
role only its resolved share of the config."""

from __future__ import annotations

import os

import ray
from omegaconf import DictConfig, OmegaConf
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

from ume_r1.grpo.local_ray import start_local_ray
from ume_r1.grpo.supervision import SupervisedGroup

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def init_ray(cfg: DictConfig) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS (set by `ray job submit`), else start a
    local Ray: token-authenticated, bound to 127.0.0.1, no dashboard (ume_r1.grpo.local_ray)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": WORKER_ENV}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    needed = cfg.rollout.num_workers + cfg.learner.num_workers + 1
    start_local_ray(cfg.ray.num_cpus or max(needed, os.cpu_count() or 1), runtime_env)


def worker_threads(cfg: DictConfig, concurrent: int) -> int:
    """OpenMP threads per worker: `ray.threads_per_worker`, else the cores shared by `concurrent` workers."""
    if cfg.ray.threads_per_worker:
        return int(cfg.ray.threads_per_worker)
    return max(1, (os.cpu_count() or 1) // concurrent)


def worker_group(
    cls, pool: RayResourcePool, threads: int, config: DictConfig, role: str, timeout_s: float
) -> SupervisedGroup:
    """A verl worker group of `cls` on `pool`, offline and with `threads` OpenMP threads per worker,
    supervised as `role`: a call that a worker does not answer within `timeout_s` is an error naming it."""
    group = RayWorkerGroup(
        pool,
        RayClassWithInitArgs(cls=ray.remote(cls), config=config),
        device_name="cuda" if pool.use_gpu else "cpu",
        worker_env={**WORKER_ENV, "OMP_NUM_THREADS": str(threads)},
    )
    return SupervisedGroup(group, cls, role, timeout_s)


def learner_config(cfg: DictConfig) -> DictConfig:
    """What a learner worker needs: its own group, the actor's optimisation settings, the reference's
    settings, and the rollout group (log-probs are of the sampling temperature; weights go to engines
    in the rollout's dtype; the hybrid worker runs the engine itself)."""
    return OmegaConf.create(
        {
            **plain(cfg.learner),
            "actor": plain(cfg.actor),
            "ref": plain(cfg.ref),
            "rollout": plain(cfg.rollout),
        }
    )


def plain(node: DictConfig) -> DictConfig:
    """A resolved, detached copy (interpolations into other groups would not survive on a worker)."""
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
