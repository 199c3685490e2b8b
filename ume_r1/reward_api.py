"""Reward plugin API: the batch a reward sees, the plugin registry and output validation.

A reward plugin is a file `rewards/<name>.py` defining
`compute_reward(batch: RewardBatch, **kwargs) -> dict[str, torch.Tensor]`; the dict holds "reward" (N,)
and optionally further (N,) components that are logged as metrics. See `rewards/README.md`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REWARDS_DIR = Path(__file__).resolve().parent.parent / "rewards"
ROLES = ("query", "target")

PluginFn = Callable[..., Mapping[str, Any]]


class RewardPluginError(RuntimeError):
    """A reward plugin failed or returned something that is not a valid reward dict."""


@dataclass
class RewardBatch:
    """Everything a reward plugin may use: one entry per response (N) or per prompt (P).

    Responses are grouped by prompt (`prompt_index`); the relation lists hold prompt indices.
    """

    embeddings: torch.Tensor  # (N, D) float, L2-normalised generative embeddings
    responses: list[str]  # N decoded responses (special tokens kept, padding removed)
    prompt_index: torch.Tensor  # (N,) long: the prompt each response was sampled from
    has_gen_emb: torch.Tensor  # (N,) bool: the response contains a <gen_emb> token
    roles: list[str]  # (P,) "query" or "target"
    positives: list[list[int]]  # (P,) prompts relevant to each prompt
    negatives: list[list[int]]  # (P,) explicit negative prompts
    in_batch_negatives: list[list[int]]  # (P,) other examples' prompts of the opposite role

    @property
    def num_prompts(self) -> int:
        return len(self.roles)

    @property
    def num_responses(self) -> int:
        return int(self.embeddings.shape[0])

    def validate(self) -> None:
        """Check shapes, dtypes and indices; raise ValueError naming the offending field."""
        if self.embeddings.ndim != 2 or not self.embeddings.is_floating_point():
            raise ValueError(
                f"embeddings: expected a 2-D float tensor (N, D), got {self.embeddings.dtype} "
                f"of shape {tuple(self.embeddings.shape)}"
            )
        n, p = self.num_responses, self.num_prompts
        if len(self.responses) != n:
            raise ValueError(f"responses: expected {n} texts (one per embedding), got {len(self.responses)}")
        for field, dtype in (("prompt_index", torch.long), ("has_gen_emb", torch.bool)):
            value = getattr(self, field)
            if value.shape != (n,) or value.dtype != dtype:
                raise ValueError(
                    f"{field}: expected a {dtype} tensor of shape ({n},), got {value.dtype} "
                    f"of shape {tuple(value.shape)}"
                )
        if n and (int(self.prompt_index.min()) < 0 or int(self.prompt_index.max()) >= p):
            raise ValueError(f"prompt_index: values must lie in [0, {p}) (num_prompts = len(roles))")
        bad_roles = sorted(set(self.roles) - set(ROLES))
        if bad_roles:
            raise ValueError(f"roles: unknown roles {bad_roles}; expected one of {ROLES}")
        for field in ("positives", "negatives", "in_batch_negatives"):
            lists = getattr(self, field)
            if len(lists) != p:
                raise ValueError(f"{field}: expected {p} lists (one per prompt), got {len(lists)}")
            for prompt, related in enumerate(lists):
                if any(not 0 <= j < p for j in related):
                    raise ValueError(f"{field}[{prompt}]: indices {related} out of range [0, {p})")
                if prompt in related:
                    raise ValueError(f"{field}[{prompt}]: a prompt cannot be related to itself")
        # A prompt that is both positive and negative would make ranking and gap meaningless.
        for prompt, pos in enumerate(self.positives):
            for field in ("negatives", "in_batch_negatives"):
                overlap = set(pos) & set(getattr(self, field)[prompt])
                if overlap:
                    raise ValueError(f"{field}[{prompt}]: {sorted(overlap)} are also in positives[{prompt}]")

    def prompt_mask(self, relation: list[list[int]]) -> torch.Tensor:
        """(P, P) bool: [p, q] is True when q is in relation[p]."""
        mask = torch.zeros(self.num_prompts, self.num_prompts, dtype=torch.bool)
        rows = [p for p, related in enumerate(relation) for _ in related]
        cols = [q for related in relation for q in related]
        mask[rows, cols] = True
        return mask.to(self.embeddings.device)

    def response_mask(self, relation: list[list[int]]) -> torch.Tensor:
        """(N, N) bool: [i, j] is True when response j's prompt is in relation[response i's prompt]."""
        idx = self.prompt_index.to(self.embeddings.device)
        return self.prompt_mask(relation)[idx][:, idx]

    def role_is_query(self) -> torch.Tensor:
        """(N,) bool: the response was sampled from a query prompt."""
        per_prompt = torch.tensor([r == "query" for r in self.roles], dtype=torch.bool)
        return per_prompt.to(self.embeddings.device)[self.prompt_index.to(self.embeddings.device)]


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
