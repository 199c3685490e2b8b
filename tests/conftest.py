"""Shared fixtures and helpers: a tiny Qwen2-VL checkpoint and small synthetic data sets built once per
session, a processor and model on it, in-process learners and batches, and writers of small inputs."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.distributed as dist
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torch.distributed.tensor import DTensor
from verl import DataProto

from sft.train import train
from ume_r1.data.files import write_atomic
from ume_r1.data.processor import UMEProcessor, load_image_processor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.eval.datasets import EVAL_SCHEMA
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.grpo.worker_groups import learner_config
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.qwen2_vl import build_qwen2_vl
from ume_r1.model.tiny import build_tiny_model
from ume_r1.synthetic.shapes import make_synthetic
from ume_r1.synthetic.shapes_sft import make_synthetic_sft
from workers.learner import LearnerWorker

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


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
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with one table for input and output embeddings and 126 spare rows past its
    tokenizer (tied and padded, as Qwen2-VL-2B)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tied") / "model", seed=0, tie_word_embeddings=True, table_rows=640
    )


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The synthetic shapes set: {"train": path, "test": path} (48 / 16 rows)."""
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=0, n_train=48, n_test=16)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The synthetic SFT set: {"train": path, "test": path} (32 / 4 rows)."""
    return make_synthetic_sft(str(tmp_path_factory.mktemp("sft_data")), seed=0, n_train=32, n_test=4)


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A stock Qwen2-VL-2B-shaped checkpoint: the real tokenizer and preprocessor, the tied 151,936-row
    table, 2 decoder layers and 1 vision block (random bf16 weights, no UME tokens)."""
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl-2b") / "model", layers=2, vision_depth=1)


@pytest.fixture(scope="session")
def qwen2_vl(qwen2_vl_dir: str) -> tuple[UMEProcessor, torch.nn.Module]:
    """The 2B-shaped checkpoint as training loads it (UME tokens added, fp32, eval mode) and its
    processor."""
    model, tokenizer = load_model(qwen2_vl_dir)
    return UMEProcessor(tokenizer, load_image_processor(qwen2_vl_dir)), model.eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir: str) -> UMEProcessor:
    """The tiny model's processor with its default limits."""
    return UMEProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: str):
    """The tiny model in eval mode (fp32, CPU) and its tokenizer."""
    model, tokenizer = load_model(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture
def single_rank(monkeypatch):
    """The environment of a one-rank process group on a free local port; destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


# the learner fixture's variants (overrides of make_learner)
PLAIN_CPU = pytest.param([], id="cpu")
FSDP2_CPU = pytest.param(["actor.strategy=fsdp2"], id="cpu-fsdp2")
CUDA = pytest.param(["trainer.device=cuda"], id="cuda", marks=pytest.mark.gpu)


@pytest.fixture(params=[PLAIN_CPU, FSDP2_CPU, CUDA])
def learner(request, tiny_model_dir, single_rank):
    """A learner worker in this process: one gloo (or nccl) rank, no Ray, the tiny profile. On CPU the
    plain module (`actor.strategy=auto`) and FSDP2."""
    return make_learner(tiny_model_dir, request.param)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor), or the tensor itself (a plain module's)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@pytest.fixture
def mixed_batch(tiny_model_dir: str, synthetic_dir: dict[str, str]) -> tuple[UMEProcessor, DataProto]:
    """A learner batch: two image prompts and one text prompt, with ragged responses (two or three
    each, seven rows)."""
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(synthetic_dir["train"])
    prompts = [processor.encode(examples[0].query), processor.encode(Side(text="a red circle"))]
    prompts.append(processor.encode(examples[1].query))
    tok = processor.tokenizer
    words = [
        ["red", "a big round red circle<gen_emb>"],
        ["blue", "star", "<think>x</think>"],
        ["a", "b c d e"],
    ]
    responses = [[tok(w, add_special_tokens=False)["input_ids"] for w in group] for group in words]
    data, _ = build_sequences(prompts, responses)
    return processor, data


@pytest.fixture
def shutdown_ray():
    """The local Ray a test's trainer starts is shut down after the test."""
    yield
    ray.shutdown()


def compose_config(name: str, *overrides: str) -> DictConfig:
    """configs/NAME.yaml with Hydra `overrides`, as the entry points compose it."""
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def grpo_config(tiny_model_dir: str, train_file: str, run_dir: Path, *extra: str) -> DictConfig:
    """The tiny GRPO profile on `train_file` into `run_dir`, console logging only, with `extra` overrides."""
    return compose_config(
        "grpo",
        "profile=tiny",
        f"model.path={tiny_model_dir}",
        f"data.train_files={train_file}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[console]",
        *extra,
    )


def run_sft(model_path: str, data: dict[str, str], out_dir: Path, *extra: str) -> dict:
    """Two steps of the tiny SFT profile from `model_path` on `data` ({"train", "test"}) into `out_dir`,
    in this process (its gloo group destroyed after), with `extra` overrides; returns train's summary."""
    cfg = compose_config(
        "sft",
        "profile=sft_tiny",
        f"model.path={model_path}",
        f"data.train_files={data['train']}",
        f"data.test_files={data['test']}",
        "train.total_steps=2",
        "train.global_batch_size=8",
        f"output_dir={out_dir}",
        "eval.max_new_tokens=8",
        *extra,
    )
    try:
        return train(cfg)
    finally:
        dist.destroy_process_group()


def make_learner(model_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> LearnerWorker:
    """A learner worker in this process under the tiny profile, joining the process group that the
    environment names (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)."""
    cfg = compose_config(
        "grpo",
        "profile=tiny",
        f"model.path={model_dir}",
        "data.train_files=unused",
        "actor.optim.lr=1e-4",
        "actor.ppo_mini_batch_size=null",
        *overrides,
    )
    worker = LearnerWorker(learner_config(cfg))
    worker.init_model(model_dir)
    return worker


def scored(learner, data, advantage: float | torch.Tensor) -> None:
    """Old and reference log-probs of the current policy, and an advantage per row."""
    data.union(learner.compute_log_prob(data))
    data.union(learner.compute_ref_log_prob(data))
    mask = data.batch["response_mask"].float()
    data.batch["advantages"] = mask * torch.as_tensor(advantage).reshape(-1, 1)
    data.meta_info["seed"] = 0
    learner.config.actor.grad_clip = 1e9  # gradients as computed, not rescaled


FORMATS = ["parquet", "jsonl", "json"]  # the row file formats every loader reads


def jsonable(value):
    """Parquet rows as JSON: image bytes become base64 strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def write_rows(rows: list[dict], path: Path, fmt: str, schema: pa.Schema | None = None) -> Path:
    """`rows` as a file of format `fmt` (one of FORMATS) at `path` with that suffix."""
    path = path.with_suffix(f".{fmt}")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(jsonable(r)) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(jsonable(rows), indent=1))
    return path


def write_eval_set(path: Path, rows: list[dict]) -> str:
    """An eval parquet file (EVAL_SCHEMA rows) at `path`."""
    write_atomic(rows, str(path), EVAL_SCHEMA)
    return str(path)


def write_eval_config(path: Path, datasets: list[dict]) -> str:
    """An eval config listing `datasets` at `path`."""
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return str(path)


def random_image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    """An RGB image of uniform random pixels, the same for the same seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")
