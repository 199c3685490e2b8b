"""Training batches, encoded ahead of the step that needs them.

The run's `BatchOrder` says which rows each step takes. A `torch.utils.data.DataLoader` with workers
encodes them (decodes media, resizes, tokenises) `prefetch_factor` batches ahead, in order, so the step
does not wait on decoding and memory follows a few batches, not the data set. Each rank asks only for
its share of a global batch.

A row that fails when it is encoded (media unreadable, or over a length limit) is named by file and
row and raised; or, under `data.on_bad_row=skip` (media) or `data.truncation=skip` (length), it is
left out and replaced by another row drawn by seed. Replacing instead of dropping keeps every step's
batch size, which the ranks of one step need (they run the same number of forward passes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.files import RowProblem, TooLong
from ume_r1.data.rows import ON_BAD_ROW, BadRowError

TRUNCATION = ("error", "skip", "truncate")
MAX_REPLACEMENTS = 16


@dataclass
class RowBatch:
    """One step's encoded rows (this rank's share), and what was replaced or cut on the way."""

    indices: list[int]  # the rows the order asked for
    rows: list[Any] = field(default_factory=list)  # encoded; a replacement in place of each skipped row
    skipped: list[str] = field(default_factory=list)  # why each left-out row was left out
    truncated: list[str] = field(default_factory=list)  # where each row cut to fit is


# encode(item) -> (encoded item, whether it was cut to fit); raises RowProblem / TooLong
Encoder = Callable[[Any], tuple[Any, bool]]


class EncodedRows(Dataset):
    """Loaded rows (media as references) -> encoded batches; `dataset[indices]` is one `RowBatch`."""

    def __init__(
        self, items: Sequence[Any], encode: Encoder, on_bad_row: str, truncation: str, seed: int
    ) -> None:
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"data.on_bad_row must be one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
        if truncation not in TRUNCATION:
            raise ValueError(f"data.truncation must be one of {list(TRUNCATION)}, got {truncation!r}")
        self.items, self.encode = items, encode
        self.on_bad_row, self.truncation, self.seed = on_bad_row, truncation, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, indices: list[int]) -> RowBatch:
        batch = RowBatch(list(indices))
        batch.rows = [self._encode(index, batch) for index in indices]
        return batch

    def _encode(self, index: int, batch: RowBatch) -> Any:
        row = index
        for attempt in range(1, MAX_REPLACEMENTS + 1):
            item = self.items[row]
            try:
                encoded, truncated = self.encode(item)
            except RowProblem as e:
                message = f"{item.where}: {e}"
                if isinstance(e, TooLong) and self.truncation != "skip":
                    raise BadRowError(f"{message} (data.truncation=skip or truncate goes on)") from None
                if not isinstance(e, TooLong) and self.on_bad_row != "skip":
                    raise BadRowError(message) from None
                batch.skipped.append(message)
                row = int(np.random.default_rng([self.seed, index, attempt]).integers(len(self.items)))
                continue
            if truncated:
                batch.truncated.append(item.where)
            return encoded
        raise BadRowError(f"{self.items[index].where} and {MAX_REPLACEMENTS - 1} replacements all failed")


class _Shares:
    """This rank's share of the next `steps` global batches, from a copy of the order (the run's own
    order advances only as steps are taken, which is what a checkpoint records)."""

    def __init__(self, order: BatchOrder, steps: int, rank: int, world: int) -> None:
        self.order, self.steps, self.rank, self.world = copy.deepcopy(order), steps, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield next(self.order)[self.rank :: self.world]

    def __len__(self) -> int:
        return self.steps


def _as_is(batch: RowBatch) -> RowBatch:
    return batch


def row_batches(
    dataset: EncodedRows,
    order: BatchOrder,
    steps: int,
    num_workers: int,
    prefetch: int = 2,
    rank: int = 0,
    world: int = 1,
) -> Iterator[RowBatch]:
    """The next `steps` batches of `order`, this rank's share, encoded by `num_workers` processes
    (0: in this one) `prefetch` batches ahead each. Create it before threads or Ray start: workers fork."""
    loader = DataLoader(
        dataset,
        batch_size=None,  # the sampler yields whole batches of indices
        sampler=_Shares(order, steps, rank, world),
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None,
        collate_fn=_as_is,
    )
    return iter(loader)


@dataclass
class BadRowCounts:
    """Rows left out or cut so far in a run, kept in checkpoints; the first message of each kind is
    printed once."""

    skipped: int = 0
    truncated: int = 0

    def add(self, batch: RowBatch, log: Callable[[str], None] = print) -> dict[str, float]:
        if batch.skipped and not self.skipped:
            log(f"data: left out {batch.skipped[0]} (and counted as data/skipped_rows from now on)")
        if batch.truncated and not self.truncated:
            log(f"data: cut to fit {batch.truncated[0]} (data.truncation=truncate; data/truncated_rows)")
        self.skipped += len(batch.skipped)
        self.truncated += len(batch.truncated)
        return {"data/skipped_rows": float(self.skipped), "data/truncated_rows": float(self.truncated)}


def gathered(batch: RowBatch, group: dist.ProcessGroup | None = None) -> RowBatch:
    """The left-out and cut rows of every rank of `group` in one batch record (rank 0 logs them)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return batch
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (batch.skipped, batch.truncated), group=group)
    return RowBatch([], [], [m for s, _ in parts for m in s], [m for _, t in parts for m in t])
