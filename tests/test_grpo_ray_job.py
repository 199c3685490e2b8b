"""The recipe submitted with `ray job submit` to a Ray head this test starts on 127.0.0.1.

Only the head started here is stopped: it runs as `ray start --block` in its own process group with
its own temp dir, and the whole group is terminated at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from ume_r1.grpo.local_ray import write_token

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with code {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (token auth may refuse the request): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout} s")


def processes_using(path: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="ume-ray-", dir="/tmp")  # short: Ray's socket paths have a length cap
    dash_port = free_port()
    # Token auth with a fresh private token; `ray start` and `ray job submit` must agree (Ray 2.60).
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(write_token()),
    }
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{dash_port}"
    try:
        wait_for_dashboard(url, head, Path(log.name))
        yield url, env
    finally:
        head.terminate()  # `ray start --block` shuts down the processes it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        deadline = time.monotonic() + 30
        while processes_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        leftovers = processes_using(temp_dir)
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"processes of the test's Ray head outlived it: {leftovers}"


@pytest.mark.parametrize(
    "layout",
    [[], ["rollout.name=vllm", "trainer.hybrid_engine=true"]],
    ids=["hf-standalone", "vllm-hybrid"],
)
def test_recipe_runs_as_ray_job(layout, ray_head, tiny_model_dir, synthetic_dir, tmp_path):
    url, env = ray_head
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            str(REPO),
            "--",
            "bash",
            "recipes/ume_r1_grpo.sh",
            "profile=tiny",
            f"model.path={tiny_model_dir}",
            f"data.train_files={synthetic_dir['train']}",
            f"trainer.default_local_dir={run_dir}",
            "trainer.total_training_steps=2",
            "trainer.logger=[console]",
            *layout,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert (run_dir / "final" / "config.json").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
