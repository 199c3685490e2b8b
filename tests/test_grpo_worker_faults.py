"""Worker faults during a GRPO run: a rollout worker killed or frozen mid-run is replaced (with the
actor's current weights) and the step retried; a dead learner rank stops the run at once with an
error naming the worker, the step and the checkpoint a restart resumes from. Nothing hangs."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import grpo_config

from ume_r1.grpo.supervision import WorkerFailure
from ume_r1.grpo.trainer import GRPOTrainer


def pids(group) -> list[int]:
    return ray.get([w.__ray_call__.remote(lambda self: os.getpid()) for w in group.group.workers])


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def after_step(run_dir: Path, step: int, action) -> threading.Thread:
    """Run `action()` as soon as `step` is logged, that is while the next step starts."""

    def wait_then_act():
        while logged_steps(run_dir) < step:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def test_a_dead_or_frozen_rollout_worker_is_replaced(tiny_model_dir, synthetic_dir, tmp_path, shutdown_ray):
    run_dir = tmp_path / "run"
    cfg = grpo_config(
        tiny_model_dir,
        synthetic_dir["train"],
        run_dir,
        "trainer.total_training_steps=3",
        "trainer.save_freq=-1",
        "trainer.worker_timeout_s=20",
        "rollout.n=4",
    )
    trainer = GRPOTrainer(cfg)
    first = pids(trainer.rollouts)
    killed = after_step(run_dir, 1, lambda: os.kill(first[0], signal.SIGKILL))
    frozen = after_step(run_dir, 2, lambda: os.kill(pids(trainer.rollouts)[1], signal.SIGSTOP))
    trainer.fit()
    killed.join(), frozen.join()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["fault/rollout_restarts"] for r in rows] == [0, 1, 2]
    # Death is noticed at once; silence after worker_timeout_s; then a new group (~10-40 s here).
    assert rows[1]["timing_s/step"] < 90
    assert 20 <= rows[2]["timing_s/step"] < 20 + 90
    assert not set(pids(trainer.rollouts)) & set(first)


def test_a_dead_learner_stops_the_run_with_a_named_error(
    tiny_model_dir, synthetic_dir, tmp_path, shutdown_ray
):
    run_dir = tmp_path / "run"
    cfg = grpo_config(
        tiny_model_dir,
        synthetic_dir["train"],
        run_dir,
        "trainer.hybrid_engine=true",
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
    )
    trainer = GRPOTrainer(cfg)
    learner = pids(trainer.learners)[0]
    killed_at = []
    after_step(run_dir, 2, lambda: (os.kill(learner, signal.SIGKILL), killed_at.append(time.monotonic())))
    with pytest.raises(WorkerFailure) as failure:
        trainer.fit()
    assert time.monotonic() - killed_at[0] < 30
    # the kill lands while step 2 is saved (usually) or early in step 3: either way the run stops
    # at that step and resumes from the checkpoint before it
    found = re.match(r"step (\d): learner worker 0 died during `\w+`: ", str(failure.value))
    assert found, failure.value
    assert f"resumes from {run_dir / f'global_step_{int(found.group(1)) - 1}'}" in str(failure.value)
