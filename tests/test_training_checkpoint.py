"""Training-state checkpoints: the directory contract (staging, pointer, pruning, resume modes), a
SIGKILL in the middle of a write, resharding from two learner ranks to one, and the data order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CUDA, PLAIN_CPU, scored
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ume_r1.data.batch_order import BatchOrder
from ume_r1.grpo.learner_batch import pad_for_ranks
from ume_r1.training.checkpoint import (
    LATEST,
    CheckpointDir,
    load_sharded,
    read_state,
    resume_checkpoint,
    save_sharded,
)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def test_commit_moves_the_pointer_last_and_keeps_the_newest(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    assert ckpts.latest() is None and resume_checkpoint("auto", tmp_path, None) is None
    for step in (2, 4, 6):
        (ckpts.begin(step) / "payload").write_text(str(step))
        assert ckpts.latest() != ckpts.path(step)  # staged, not yet the latest
        ckpts.commit(step, {"x": step})
    assert (tmp_path / LATEST).read_text() == "6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_4", "global_step_6", LATEST]
    assert read_state(ckpts.latest()) == {"step": 6, "x": 6}
    assert resume_checkpoint("resume_path", tmp_path, str(ckpts.path(4))) == ckpts.path(4)
    assert resume_checkpoint("disable", tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resume_checkpoint("resume_path", tmp_path, str(tmp_path / "global_step_2"))
    with pytest.raises(ValueError, match="resume_mode='sometimes'"):
        resume_checkpoint("sometimes", tmp_path, None)


WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    from ume_r1.training.checkpoint import CheckpointDir, save_sharded

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    optimizer = torch.optim.AdamW(model.parameters())
    ckpts = CheckpointDir(sys.argv[1])
    for step in (2, 4):
        model(torch.randn(4, 1024)).square().mean().backward()
        optimizer.step()
        if step == 4:  # the kill lands once the data files are written, before the metadata
            finish = FileSystemWriter.finish
            def stalled(self, *args, **kwargs):
                print("data written", flush=True)
                time.sleep(600)
                return finish(self, *args, **kwargs)
            FileSystemWriter.finish = stalled
        save_sharded(ckpts.begin(step) / "actor", model, optimizer)
        ckpts.commit(step, {"weight_sum": float(sum(p.double().sum() for p in model.parameters()))})
    """
)


def test_a_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "data written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.latest() == ckpts.path(2)
    assert ckpts.discard_partial() == [ckpts.staging(4)]
    assert not ckpts.staging(4).exists()

    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    optimizer = torch.optim.AdamW(model.parameters())
    load_sharded(ckpts.latest() / "actor", model, optimizer)
    assert (
        float(sum(p.double().sum() for p in model.parameters())) == read_state(ckpts.latest())["weight_sum"]
    )
    assert int(optimizer.state_dict()["state"][0]["step"]) == 1


def test_a_tied_weight_is_written_once_and_restored_tied(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    optimizer = torch.optim.AdamW(model.parameters())
    save_sharded(tmp_path, model, optimizer)
    saved = FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert "model.0.weight" in saved and "model.1.weight" not in saved
    expected = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.zero_()
    load_sharded(tmp_path, model, optimizer)
    assert model[1].weight is model[0].weight and torch.equal(model[0].weight, expected)


def _rank_save(rank: int, port: int, model_dir: str, data, out: str) -> None:
    """One of two learner ranks: one update on its half of the rows, then a checkpoint; rank 0 also
    writes the gathered model and optimizer state for comparison."""
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    from conftest import make_learner  # pytest put tests/ on sys.path, and spawn passes it on

    learner = make_learner(model_dir)
    learner.update_actor(data.chunk(2)[rank])
    scheduler = learner.save_state(f"{out}/actor")
    model, optim = get_state_dict(learner.policy, learner.optimizer, options=FULL)
    if rank == 0:
        torch.save({"model": model, "optim": optim, "scheduler": scheduler}, f"{out}/full.pt")
    torch.distributed.destroy_process_group()


# two FSDP2 ranks against one: the plain module on CPU (FSDP2 on one rank is the other tests')
@pytest.mark.parametrize("learner", [PLAIN_CPU, CUDA], indirect=True)
def test_two_rank_checkpoint_resumes_on_one_rank(learner, tiny_model_dir, mixed_batch, tmp_path):
    _, data = mixed_batch
    scored(learner, data, torch.linspace(-1.0, 1.5, len(data)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    padded = pad_for_ranks(data, 2)
    mp.spawn(_rank_save, args=(port, tiny_model_dir, padded, str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "full.pt")

    learner.load_state(str(tmp_path / "actor"), saved["scheduler"])
    model, optim = get_state_dict(learner.policy, learner.optimizer, options=FULL)
    assert model.keys() == saved["model"].keys()
    for name, value in saved["model"].items():
        torch.testing.assert_close(model[name], value, rtol=0, atol=0, msg=name)
    assert optim["state"].keys() == saved["optim"]["state"].keys() and optim["state"]
    for name, state in saved["optim"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optim["state"][name][key], value, rtol=0, atol=0, msg=f"{name} {key}")
    assert learner.scheduler.state_dict() == saved["scheduler"]
    learner.update_actor(data)  # and training goes on from there


def test_batch_order_resumes_at_its_position():
    order = BatchOrder(num_rows=10, batch_size=3, seed=7)
    seen = [next(order) for _ in range(5)]  # three batches an epoch: into the second epoch
    assert len({i for b in seen[:3] for i in b}) == 9  # an epoch: disjoint batches, the 10th row dropped
    assert seen[3:5] != seen[0:2]  # the next epoch is another permutation
    state = order.state_dict()
    later = [next(order) for _ in range(4)]
    resumed = BatchOrder(num_rows=10, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(4)] == later
    with pytest.raises(ValueError, match="has num_rows=10, this run's has 11"):
        BatchOrder(num_rows=11, batch_size=3, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="has batch_size=3, this run's has 2"):
        BatchOrder(num_rows=10, batch_size=2, seed=7).load_state_dict(state)


def test_the_metrics_log_and_wandb_run_continue(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from ume_r1.training.metric_logger import MetricLogger, read_metrics

    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # wandb.init sets it; undone after the test
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create(
        {
            "trainer": {
                "logger": ["wandb"],
                "project_name": "p",
                "experiment_name": "e",
                "wandb_mode": "offline",
            }
        }
    )
    first = MetricLogger(cfg, tmp_path)
    for step in (1, 2, 3):
        first.log({"x": float(step)}, step)
    first.finish()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "x"')  # a line cut short by a kill

    resumed = MetricLogger(cfg, tmp_path, resumed_step=2, run_id=first.run_id)  # checkpoint of step 2
    assert resumed.wandb.id == first.run_id
    resumed.log({"x": 3.5}, 3)
    resumed.finish()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.5),
    ]
    assert MetricLogger(OmegaConf.create({"trainer": {"logger": []}}), tmp_path).path.read_text() == ""
