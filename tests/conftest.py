"""Shared fixtures: a tiny Qwen2-VL checkpoint and a small synthetic data set, built once per session."""

from __future__ import annotations

import pytest
import torch

from ume_r1.model import build_tiny_model
from ume_r1.synthetic import make_synthetic


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny randomly initialised Qwen2-VL (hidden size 64) with tokenizer and image processor."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The synthetic shapes set: {"train": path, "test": path} (48 / 16 rows)."""
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=0, n_train=48, n_test=16)
