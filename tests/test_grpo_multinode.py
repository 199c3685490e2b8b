"""Worker groups that span nodes: a Ray cluster of five one-CPU nodes on this machine
(`ray.cluster_utils.Cluster`), two learners and two standalone rollout workers, one GRPO step.

With one CPU a node, a role's workers can share no node: one pool entry of two (the layout before,
a single strictly packed group) never schedules, and one entry per node (verl's layout) must spread."""

from __future__ import annotations

import json

import pytest
import ray
from conftest import grpo_config
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from ume_r1.grpo.trainer import GRPOTrainer
from ume_r1.grpo.worker_groups import node_pool, pool_threads


@pytest.fixture
def cluster():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(4):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_node_pool_needs_an_even_split():
    assert node_pool(4, 2, False, "learner.num_workers")._store == [2, 2]
    with pytest.raises(ValueError, match=r"learner.num_workers=3 does not split evenly over 2 node"):
        node_pool(3, 2, False, "learner.num_workers")


def test_learners_and_rollout_workers_spread_over_nodes(cluster, tiny_model_dir, synthetic_dir, tmp_path):
    ray.init(address=cluster.address)
    packed = placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK")  # the old single entry
    assert not packed.wait(timeout_seconds=3)
    remove_placement_group(packed)

    cfg = grpo_config(
        tiny_model_dir,
        synthetic_dir["train"],
        tmp_path / "run",
        f"ray.address={cluster.address}",
        "learner.num_workers=2",
        "trainer.nnodes=2",
        "rollout.num_workers=2",
        "rollout.nnodes=2",
        "trainer.total_training_steps=1",
        "data.train_batch_size=4",
        "rollout.n=4",
        "trainer.save_freq=-1",
        "trainer.reasoning_sensitivity_freq=0",
    )
    trainer = GRPOTrainer(cfg)
    nodes = {}
    for role, group in {"learner": trainer.learners, "rollout": trainer.rollouts}.items():
        pool = group.group.resource_pool
        nodes[role] = [placement_group_table(pg)["bundles_to_node_id"][0] for pg in pool.pgs]
        assert len(set(nodes[role])) == 2, (role, nodes[role])
        assert pool_threads(pool) == 1  # one core a node, one worker of the role on it
    assert len(set(nodes["learner"] + nodes["rollout"])) == 4
    trainer.fit()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["sync/bytes"] > 0 and row["training/rollout_probs_diff_max"] < 2e-4
