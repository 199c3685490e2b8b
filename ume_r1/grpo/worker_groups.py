"""How the controller puts its worker groups on Ray: join a cluster or start the locked local Ray, lay a
role's workers over nodes (verl's one resource-pool entry per node), build a verl worker group of one
role (supervised: a lost or silent worker is an error naming it) with OpenMP threads from the cores of
the nodes it landed on, and hand each role only its resolved share of the config."""

from __future__ import annotations

import os
from collections import Counter

import ray
from omegaconf import DictConfig, OmegaConf
from ray.util.placement_group import placement_group_table
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


def node_pool(workers: int, nnodes: int, use_gpu: bool, key: str) -> RayResourcePool:
    """`workers` spread evenly over `nnodes` nodes, verl's way: one pool entry per node, each a strictly
    packed placement group of that node's share (a single entry of all of them is one group that never
    schedules past one node: 16 learners on two 8-GPU nodes would wait for ever)."""
    if nnodes < 1 or workers % nnodes:
        raise ValueError(f"{key}={workers} does not split evenly over {nnodes} node(s)")
    return RayResourcePool([workers // nnodes] * nnodes, use_gpu=use_gpu, max_colocate_count=1)


def node_cores() -> dict[str, int]:
    """Cores of each live node: its CPU resource, and on the driver's node no more than the machine
    has (a local Ray may declare more CPUs than there are cores)."""
    here = ray.get_runtime_context().get_node_id()
    cores = {}
    for node in ray.nodes():
        if node["Alive"]:
            count = int(node["Resources"].get("CPU", 1))
            cores[node["NodeID"]] = min(count, os.cpu_count() or 1) if node["NodeID"] == here else count
    return cores


def pool_threads(pool: RayResourcePool) -> int:
    """OpenMP threads per worker of `pool`: on each node its workers share the node's cores (the roles
    take turns through a step, so one role's workers need not leave cores to another's); the smallest
    share over the nodes the pool landed on."""
    groups = pool.get_placement_groups(device_name="cuda" if pool.use_gpu else "cpu")
    per_node = Counter(
        node for group in groups for node in placement_group_table(group)["bundles_to_node_id"].values()
    )
    cores = node_cores()
    return max(1, min(cores[node] // count for node, count in per_node.items()))


def worker_group(
    cls, pool: RayResourcePool, config: DictConfig, role: str, timeout_s: float, threads: int | None = None
) -> SupervisedGroup:
    """A verl worker group of `cls` on `pool`, offline and with `threads` OpenMP threads per worker
    (`ray.threads_per_worker`; None: `pool_threads`), supervised as `role`: a call that a worker does not
    answer within `timeout_s` is an error naming it."""
    group = RayWorkerGroup(
        pool,
        RayClassWithInitArgs(cls=ray.remote(cls), config=config),
        device_name="cuda" if pool.use_gpu else "cpu",
        worker_env={**WORKER_ENV, "OMP_NUM_THREADS": str(threads or pool_threads(pool))},
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
