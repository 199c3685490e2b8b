"""The local Ray a run starts is locked: a client without the run's token is refused, every process
of it listens on 127.0.0.1 only, and the token is private to the run and never written to a log."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import psutil
import pytest
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from ume_r1.grpo.local_ray import start_local_ray

    start_local_ray(num_cpus=1, runtime_env={})
    ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
    print(json.dumps({
        "gcs": ray.get_runtime_context().gcs_address,
        "token_path": os.environ["RAY_AUTH_TOKEN_PATH"],
        "session_dir": ray._private.worker._global_node.get_session_dir_path(),
    }), flush=True)
    sys.stdin.read()  # until the test closes it
    ray.shutdown()
    """
)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def cluster_id(address: str, token: str | None):
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        return stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=metadata)


@pytest.fixture(scope="module")
def local_ray():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    info = json.loads(driver.stdout.readline())
    processes = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
    yield driver, info, processes
    driver.stdin.close()
    driver.wait(timeout=120)


def test_a_client_without_the_token_is_refused(local_ray):
    _, info, _ = local_ray
    token = Path(info["token_path"]).read_text()
    for wrong in (None, "0" * len(token)):
        with pytest.raises(grpc.RpcError) as refused:
            cluster_id(info["gcs"], wrong)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cluster_id(info["gcs"], token).cluster_id


def test_every_listener_is_on_loopback(local_ray):
    _, info, processes = local_ray
    assert info["gcs"].startswith("127.0.0.1:")
    listening = []
    for proc in processes:
        try:
            sockets = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [(proc.name(), c.laddr) for c in sockets if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4  # GCS, raylet, driver, worker at least
    assert all(addr.ip in LOOPBACK for _, addr in listening), listening


def test_the_token_is_private_and_never_logged(local_ray):
    driver, info, processes = local_ray
    path = Path(info["token_path"])
    token = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for log in Path(info["session_dir"], "logs").rglob("*"):
        if log.is_file():
            assert token not in log.read_text(errors="replace"), log
    for proc in processes:
        try:
            assert token not in " ".join(proc.cmdline()) and token not in json.dumps(proc.environ())
        except psutil.NoSuchProcess:
            continue
