"""The order in which training rows are visited: global batches, epoch after epoch, each epoch its own
permutation. The order is a function of (seed, epoch), so a position of two integers is all a
checkpoint needs to resume exactly where a run stopped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BatchOrder:
    num_rows: int
    batch_size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    next_batch: int = 0  # within the epoch

    def __post_init__(self) -> None:
        if not 0 < self.batch_size <= self.num_rows:
            raise ValueError(f"batch size {self.batch_size} does not fit {self.num_rows} rows")
        self._permutation: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size  # the incomplete last batch is dropped

    def __iter__(self) -> BatchOrder:
        return self

    def __next__(self) -> list[int]:
        if self.next_batch >= self.batches_per_epoch:
            self.epoch, self.next_batch, self._permutation = self.epoch + 1, 0, None
        if self._permutation is None:
            self._permutation = (
                np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
                if self.shuffle
                else np.arange(self.num_rows)
            )
        start = self.next_batch * self.batch_size
        self.next_batch += 1
        return self._permutation[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # the same position in other data, or in batches of another size, is another order
        for key in ("num_rows", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's data order has {key}={state[key]}, this run's has {getattr(self, key)}"
                )
        self.epoch, self.next_batch, self._permutation = int(state["epoch"]), int(state["next_batch"]), None
