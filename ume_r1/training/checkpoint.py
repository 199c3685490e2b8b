"""Training-state checkpoints, shared by the GRPO controller and the SFT torch backend.

A run directory holds `global_step_N/` checkpoints and verl's `latest_checkpointed_iteration.txt`:

    global_step_N/
      actor/             torch.distributed.checkpoint: every rank writes its shard of the model and
                         optimizer; loading reshards to any number of ranks
      trainer_state.json step, data position, LR scheduler, RNG states of every process, resolved
                         config, reference model path, wandb run id (plain JSON: no pickle to load)
      hf/                optional HF export

A checkpoint is written under `global_step_N.tmp` and renamed when complete; the pointer file is
replaced last. A kill at any moment leaves the previous checkpoint as the latest; leftovers of an
interrupted write are removed on the next start.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.json"
SHARDS = "actor"
_STEP_DIR = re.compile(r"global_step_(\d+)")


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer, each rank its own shard (torch.distributed.checkpoint). A tied weight (the
    2B model's embeddings and LM head) is written once. Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = {k: v for k, v in model_state.items() if k not in _aliases(model)}
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The inverse of `save_sharded`, resharded to this run's ranks. Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    aliases = _aliases(model)
    state = {"model": {k: v for k, v in model_state.items() if k not in aliases}, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    state["model"].update({alias: state["model"][name] for alias, name in aliases.items()})
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Parameter names that are another name's parameter (tied weights): alias -> first name."""
    first, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    return aliases


def rng_state() -> dict:
    """This process's python, numpy and torch generators, as JSON-able values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class CheckpointDir:
    """The checkpoints of one run directory: staging, commit, the latest, pruning to `keep`."""

    def __init__(self, root: str | Path, keep: int | None = None) -> None:
        self.root = Path(root)
        self.keep = keep if keep and keep > 0 else None

    def path(self, step: int) -> Path:
        return self.root / f"global_step_{step}"

    def staging(self, step: int) -> Path:
        return self.root / f"global_step_{step}.tmp"

    def begin(self, step: int) -> Path:
        """A fresh staging directory for the checkpoint of `step`."""
        staging = self.staging(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int, state: dict) -> Path:
        """Write `state`, rename staging to `global_step_<step>`, then point the pointer file at it and
        drop the oldest checkpoints beyond `keep`."""
        staging = self.staging(step)
        _write_atomic(staging / STATE, json.dumps({"step": step, **state}))
        final = self.path(step)
        if final.exists():  # written by an earlier attempt that died before moving the pointer
            shutil.rmtree(final)
        os.rename(staging, final)
        _write_atomic(self.root / LATEST, str(step))
        self._prune(step)
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        text = pointer.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{pointer}: expected a step number, found {text[:40]!r}")
        path = self.path(int(text))
        if not (path / STATE).is_file():
            raise FileNotFoundError(f"{pointer} names step {text}, but {path / STATE} is missing")
        return path

    def discard_partial(self) -> list[Path]:
        """Remove what interrupted writes left behind; returns what was removed."""
        partial = sorted(self.root.glob("global_step_*.tmp")) if self.root.is_dir() else []
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return partial

    def _prune(self, latest: int) -> None:
        if self.keep is None:
            return
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
        for step in steps[: -self.keep]:
            if step != latest:
                shutil.rmtree(self.path(step), ignore_errors=True)


def save_all_ranks(checkpoints: CheckpointDir, step: int, write: Callable[[Path], None], state: dict) -> None:
    """One checkpoint of a torchrun job (the SFT backends): rank 0 stages it, every rank `write`s its
    shards into the staging directory, the ranks' RNG states are gathered, rank 0 commits `state`.
    Collective."""
    if dist.get_rank() == 0:
        checkpoints.begin(step)
    dist.barrier()
    write(checkpoints.staging(step))
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if dist.get_rank() == 0:
        checkpoints.commit(step, {**state, "rng": rngs})
    dist.barrier()


def restore_all_ranks(path: Path, read: Callable[[Path], None], scheduler, order) -> dict:
    """The inverse of `save_all_ranks` on every rank: `read` loads the shards, then the LR scheduler,
    the data position and this rank's RNG (ranks beyond the saved ones wrap round). Returns the state."""
    state = read_state(path)
    read(path)
    scheduler.load_state_dict(state["scheduler"])
    order.load_state_dict(state["data"])
    set_rng_state(state["rng"][dist.get_rank() % len(state["rng"])])
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state


def resume_checkpoint(mode: str, root: str | Path, resume_from_path: str | None) -> Path | None:
    """verl's `trainer.resume_mode`: `auto` (the latest complete checkpoint of `root`, if any),
    `disable`, or `resume_path` (`trainer.resume_from_path`, which must be a complete checkpoint)."""
    if mode == "disable":
        return None
    if mode == "auto":
        return CheckpointDir(root).latest()
    if mode == "resume_path":
        if not resume_from_path:
            raise ValueError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
        path = Path(resume_from_path)
        if not (path / STATE).is_file():
            raise FileNotFoundError(
                f"trainer.resume_from_path={resume_from_path}: no {STATE}, not a complete checkpoint"
            )
        return path
    raise ValueError(f"trainer.resume_mode={mode!r}: expected auto, disable or resume_path")


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
