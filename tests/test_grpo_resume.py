"""Exact resume: a run killed with SIGKILL (its whole process group, a local Ray included) during
step 3 of 4 and started again with the same command ends with the same metrics and the same weights, bit
for bit, as a run that was never interrupted. GRPO (the tiny profile) and the SFT torch backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from ume_r1.training.checkpoint import LATEST

REPO = Path(__file__).resolve().parent.parent
# Wall-clock and memory figures differ between any two runs; everything else must not.
TIMED = ("timing_s/", "sync/seconds", "tokens_per_s", "elapsed_s", "perf/peak_memory_gb/")


def grpo_command(model: str, train: str, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ume_r1.grpo.trainer",
        "profile=tiny",
        f"model.path={model}",
        f"data.train_files={train}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.total_training_steps=4",
        "trainer.save_freq=1",  # default loggers: console and wandb (offline)
        "rollout.n=4",
    ]


def sft_command(model: str, train: str, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sft.train",
        "profile=sft_tiny",
        f"model.path={model}",
        f"data.train_files={train}",
        "data.test_files=null",
        f"output_dir={run_dir}",
        "train.total_steps=4",
        "train.save_freq=1",
        "train.global_batch_size=8",
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]


def kill_group_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 600) -> float:
    """SIGKILL the process group of `proc` as soon as `ready()` holds; returns when that was."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited before the kill:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.05)
    members = [p for p in psutil.process_iter(["pid"]) if _session(p) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(members, timeout=30)
    assert not alive, f"processes of the killed run survived: {alive}"
    return time.monotonic()


def _session(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMED)} for row in rows]


def pointer(run_dir: Path) -> int:
    path = run_dir / LATEST
    return int(path.read_text()) if path.is_file() else 0


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_resumes_exactly_after_sigkill(stage, tiny_model_dir, synthetic_dir, sft_dir, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    log = tmp_path / "log.txt"
    make_command, train = {
        "grpo": (grpo_command, synthetic_dir["train"]),
        "sft": (sft_command, sft_dir["train"]),
    }[stage]
    command = make_command(tiny_model_dir, train, killed)

    # The uninterrupted run goes alongside (results do not depend on the load: CPU runs repeat exactly).
    uninterrupted = start(make_command(tiny_model_dir, train, whole), tmp_path / "whole.txt")
    # A checkpoint every step: once step 2's is committed, step 3 is under way.
    proc = start(command, log)
    kill_group_when(proc, lambda: pointer(killed) == 2, log)
    assert [row["step"] for row in metrics(killed)] == [1, 2]

    finish(start(command, log), log)
    finish(uninterrupted, tmp_path / "whole.txt")

    assert "resumed from" in log.read_text()
    resumed, uninterrupted = metrics(killed), metrics(whole)
    assert [row["step"] for row in resumed] == list(range(1, 5))
    assert resumed == uninterrupted
    a, b = load_file(killed / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert sorted(p.name for p in killed.glob("global_step_*")) == ["global_step_3", "global_step_4"]
