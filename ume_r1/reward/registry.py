"""The reward plugin registry: reward name -> file in `rewards/` (or a directory or file the user names),
imported under a private module name, called with its output checked (one finite value per response).
Plugins are code, so nothing else is ever searched: not `sys.path`, not the working directory."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ume_r1.reward.batch import RewardBatch

REWARDS_DIR = Path(__file__).resolve().parents[2] / "rewards"
PluginFn = Callable[..., Mapping[str, Any]]


class RewardPluginError(RuntimeError):
    """A reward plugin failed or returned something that is not a valid reward dict."""


@dataclass
class RewardFn:
    """A loaded reward plugin; calling it validates the batch and the plugin's output."""

    name: str
    file: Path
    fn: PluginFn
    source: str | None = None  # the user's `path` argument, kept so the plugin can be re-loaded elsewhere

    def __call__(self, batch: RewardBatch, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch.validate()
        try:
            out = self.fn(batch, **kwargs)
        except Exception as exc:
            raise RewardPluginError(f"reward plugin '{self.name}' ({self.file}) raised: {exc!r}") from exc
        return self._check(out, batch.num_responses)

    def _check(self, out: object, n: int) -> dict[str, torch.Tensor]:
        where = f"reward plugin '{self.name}' ({self.file})"
        if not isinstance(out, Mapping):
            raise RewardPluginError(f"{where} returned {type(out).__name__}, expected a dict of tensors")
        if "reward" not in out:
            raise RewardPluginError(f"{where} returned keys {sorted(out)} without 'reward'")
        checked = {}
        for key, value in out.items():
            if not isinstance(value, torch.Tensor):
                raise RewardPluginError(f"{where}: '{key}' is a {type(value).__name__}, expected a tensor")
            if value.shape != (n,):
                raise RewardPluginError(
                    f"{where}: '{key}' has shape {tuple(value.shape)}, expected ({n},) (one per response)"
                )
            value = value.detach().to(torch.float32)
            if not torch.isfinite(value).all():
                raise RewardPluginError(f"{where}: '{key}' of shape {tuple(value.shape)} contains NaN or inf")
            checked[str(key)] = value
        return checked

    def __reduce__(self) -> tuple[Callable[..., RewardFn], tuple[str, str | None]]:
        # Module objects do not pickle; Ray ships the name and path and each worker re-imports the file.
        return load_reward, (self.name, self.source)


def _plugins_in(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise ValueError(f"reward directory {directory} does not exist")
    return {f.stem: f for f in sorted(directory.glob("*.py")) if not f.name.startswith("_")}


def available_rewards(extra_dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Reward name -> plugin file, from `rewards/` and then `extra_dirs` (later entries win).

    Plugins are code, so only these directories are ever searched, never `sys.path`.
    """
    found = _plugins_in(REWARDS_DIR)
    for directory in extra_dirs:
        found.update(_plugins_in(Path(directory).expanduser().resolve()))
    return found


def _import_file(name: str, file: Path) -> Any:
    # A private, path-derived module name: never shadows or reuses an importable module.
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:12]
    module_name = f"_ume_r1_reward_{name}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward plugin '{name}': cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    # Registered before execution so that dataclasses and pickling inside the plugin can find it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_reward(name: str, path: str | None = None) -> RewardFn:
    """Load reward plugin `name` from `rewards/`.

    `path` may name a plugin file (used as the plugin, whatever `name` says) or a directory that is
    searched before `rewards/`.
    """
    if path is not None and Path(path).suffix == ".py":
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise ValueError(f"reward plugin file {file} does not exist")
    else:
        found = available_rewards([path] if path is not None else [])
        if name not in found:
            raise KeyError(f"unknown reward '{name}'; available rewards: {', '.join(sorted(found))}")
        file = found[name]
    module = _import_file(name, file)
    fn = getattr(module, "compute_reward", None)
    if not callable(fn):
        raise ValueError(f"reward plugin '{name}' ({file}) does not define a callable compute_reward")
    return RewardFn(name=name, file=file, fn=fn, source=path)
