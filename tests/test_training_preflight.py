"""Preflight: an output directory that cannot be written, or a disk without room for one checkpoint,
is a named error before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import grpo_config

import ume_r1.training.preflight as preflight
from ume_r1.grpo.trainer import GRPOTrainer
from ume_r1.training.preflight import PreflightError, check_output_dir, checkpoint_bytes


def test_checkpoint_size_is_the_safetensors(tiny_model_dir):
    files = list(Path(tiny_model_dir).glob("*.safetensors"))
    assert files and checkpoint_bytes(tiny_model_dir) == sum(f.stat().st_size for f in files)


def test_output_dir_is_created_and_left_clean(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b", 1, "trainer.default_local_dir")
    assert out.is_dir() and not list(out.iterdir())


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError, match=r"output_dir=.*a-file/run is not a writable directory"):
        check_output_dir(blocker / "run", 1, "output_dir")


def test_full_disk_is_named(tmp_path, monkeypatch):
    real = preflight.shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    with pytest.raises(
        PreflightError, match=r"trainer.default_local_dir=.*0.00 GiB free.*needs about 1.00 GiB"
    ):
        check_output_dir(tmp_path, 2**30, "trainer.default_local_dir")


def test_grpo_refuses_an_unwritable_run_dir_before_starting_workers(tiny_model_dir, synthetic_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = grpo_config(tiny_model_dir, synthetic_dir["train"], blocker / "run")
    with pytest.raises(PreflightError, match="trainer.default_local_dir="):
        GRPOTrainer(cfg)
