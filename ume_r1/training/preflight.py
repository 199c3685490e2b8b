"""Checks a run makes before its first step, so that an unwritable output directory or a disk without
room for a checkpoint fails in seconds with the setting's name, not after hours of training."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

GIB = 2**30


class PreflightError(RuntimeError):
    """A run's output location cannot take its checkpoints."""


def checkpoint_bytes(model_path: str | os.PathLike) -> int:
    """Size of one HF checkpoint of this model: its safetensors files."""
    return sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))


def check_output_dir(path: str | os.PathLike, needed_bytes: int, setting: str) -> Path:
    """Create `path` if needed, prove a file can be written there, and that the disk has room for
    `needed_bytes`. Raises PreflightError naming `setting` (the config key) otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise PreflightError(f"{setting}={out} is not a writable directory: {exc}") from exc
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise PreflightError(
            f"{setting}={out}: {free / GIB:.2f} GiB free on its disk, but one checkpoint needs about "
            f"{needed_bytes / GIB:.2f} GiB"
        )
    return out
