"""Training state of the megatron backend in megatron-core's distributed checkpoint format.

`save_megatron_state` writes the model and the optimizer with `megatron.core.dist_checkpointing`
(torch_dist backend): every tensor is stored under a global key with its global shape, each rank writes
the slices it is the main replica of, so a checkpoint loads under another tensor-parallel size.

- language model (`gpt.*`): the GPTModel's own `sharded_state_dict` (TP-sharded tensors);
- everything else (`model.visual.*`, ...): replicated on every rank, wrapped by megatron's
  `make_sharded_tensors_for_checkpoint` with replica id (0, tp rank, dp rank), so rank (0, 0) writes it;
- optimizer (plain torch AdamW): as megatron's FP32Optimizer does it, each state tensor (`exp_avg`,
  `exp_avg_sq`) takes the sharding of its parameter (`optimizer.state.<name>.<param key>`), the param
  groups' hyperparameters go to the common file, and `step` is stored per parameter key in the common
  file (megatron keeps a single common step; a key per parameter also covers parameters that started
  stepping later, and stays valid under another TP size since TP shards of a parameter step together).

Without CUDA (tests on CPU, one gloo rank) the save works through `_without_cuda`; see there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from sft.megatron.model import MegatronQwen2VL

GPT_PREFIX = "gpt."


def model_sharded_state_dict(model: MegatronQwen2VL) -> ShardedStateDict:
    """The whole model as ShardedTensors/ShardedObjects keyed like `model.state_dict()`. The tensors are
    the model's parameters themselves (keep_vars), so the optimizer state can be matched to them."""
    sharded = model.gpt.sharded_state_dict(prefix=GPT_PREFIX)
    rest = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(GPT_PREFIX)}
    sharded.update(make_sharded_tensors_for_checkpoint(rest, prefix=""))
    return sharded


def param_keys(optimizer: torch.optim.Optimizer, model_sharded: ShardedStateDict) -> dict[int, str]:
    """Optimizer parameter index (the index of `optimizer.state_dict()`) -> that parameter's key."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = get_param_id_to_sharded_param_map(model_sharded, params)
    missing = [i for i in range(len(params)) if i not in sharded]
    if missing:
        raise ValueError(f"optimizer parameters {missing[:5]} are not in the model's sharded state dict")
    return {i: ten.key for i, ten in sharded.items()}


def optimizer_sharded_state_dict(
    optimizer: torch.optim.Optimizer, model_sharded: ShardedStateDict, init_keys: Collection[str] = ()
) -> dict:
    """The optimizer's state dict with every state tensor sharded like its parameter (megatron's
    `FP32Optimizer.sharded_state_dict`). For loading, `init_keys` names the parameters (by key) whose
    state is in the checkpoint: those without state get zeros first, for the loaded values to land in
    (megatron's `init_state_fn`)."""
    keys = param_keys(optimizer, model_sharded)
    index = 0
    for group in optimizer.param_groups:
        names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if group.get("amsgrad") else 2]
        for p in group["params"]:
            if keys[index] in init_keys and not optimizer.state[p]:
                optimizer.state[p].update({name: torch.zeros_like(p) for name in names})
            index += 1
    state = optimizer.state_dict()  # the tensors are the live state, not copies
    steps = {keys[i]: s["step"] for i, s in state["state"].items() if "step" in s}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optim_state_to_sharding_state(
        state, get_param_id_to_sharded_param_map(model_sharded, params), exclude_keys=("step",)
    )
    state["steps"] = steps  # plain values: rank 0 writes them to the common file
    return state


def save_megatron_state(path: str | Path, model: MegatronQwen2VL, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer into the directory `path` (created if missing). Collective over all ranks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sharded = model_sharded_state_dict(model)
    state = {"model": model_sharded, "optimizer": optimizer_sharded_state_dict(optimizer, model_sharded)}
    with _without_cuda():
        dist_checkpointing.save(state, str(path))


def load_megatron_state(path: str | Path, model: MegatronQwen2VL, optimizer: torch.optim.Optimizer) -> None:
    """The inverse of `save_megatron_state`, resharded to this run's tensor-parallel layout. The
    optimizer must hold the saved run's parameters. Collective over all ranks."""
    path = str(path)
    prefix = "optimizer.state.exp_avg."
    with_state = {
        key.removeprefix(prefix)
        for key in dist_checkpointing.load_tensors_metadata(path)
        if key.startswith(prefix)
    }
    model_sharded = model_sharded_state_dict(model)
    keys = param_keys(optimizer, model_sharded)  # first: loading applies the factories in place
    request = {
        "model": model_sharded,
        "optimizer": optimizer_sharded_state_dict(optimizer, model_sharded, init_keys=with_state),
    }
    loaded = dist_checkpointing.load(request, path)

    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    optim = loaded["optimizer"]
    steps = optim.pop("steps")
    for i, param_state in optim["state"].items():
        param_state["step"] = steps[keys[i]]
    optimizer.load_state_dict(optim)


@contextmanager
def _without_cuda() -> Iterator[None]:
    """megatron-core 0.16's torch_dist save calls torch.cuda.synchronize() after its host copies and
    puts a status flag on torch.cuda.current_device(): both raise in a process without CUDA. There,
    every tensor is already in host memory and gloo broadcasts host tensors, so for the save the two
    become a no-op and "cpu". Nothing is patched when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    with (
        patch.object(torch.cuda, "synchronize", lambda device=None: None),
        patch.object(torch.cuda, "current_device", lambda: "cpu"),
    ):
        yield
