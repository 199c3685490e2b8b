"""A local Ray that nobody else can use: Ray's token authentication with a fresh random token per
run, and every listener on 127.0.0.1.

Left to itself, Ray 2.60's `ray.init()` turns token auth on with a token it writes to
`~/.ray/auth_token` (mode 644, shared by every run of the user), and rewrites a node address of
127.0.0.1 into the machine's external address, so its GCS, raylet, workers and agents listen on
every interface. Here the token lives in a private temporary directory (0700, file 0600), is named
to Ray by path only (`RAY_AUTH_TOKEN_PATH`: never in an environment listing or a log), and is removed
when the driver exits.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationTokenLoader, Config


def write_token() -> Path:
    """A fresh random token in a new private directory (removed when this process exits)."""
    directory = tempfile.mkdtemp(prefix="ume-ray-auth-")  # mode 0700
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = Path(directory) / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def start_local_ray(num_cpus: int, runtime_env: dict) -> None:
    """`ray.init` of a new single-node cluster, token-authenticated and bound to 127.0.0.1. The
    settings go into this process's environment, so Ray's own processes inherit them."""
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(write_token()),
            ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0",  # keep 127.0.0.1 as the node address
        }
    )
    # Ray read both settings when it was imported; refresh them as its own `_enable_token_auth` does.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
    )
