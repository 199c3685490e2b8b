"""Weight movement to rollout engines: named tensors grouped into buckets of bounded size.

A bucket never splits a layer (vLLM fuses a layer's q/k/v and gate/up projections, and a layer
reloaded in part would be processed with stale halves), so a bucket is one or more whole layers;
a single layer larger than the bound is a bucket of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

Named = list[tuple[str, torch.Tensor]]


def layer_key(name: str) -> str:
    """The name up to its first numeric part: `model.language_model.layers.3.mlp.up_proj.weight` ->
    `model.language_model.layers.3`; names without one (embeddings, norms, lm_head) are their own."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[Named]:
    """Consecutive (name, tensor) pairs in lists of at most `max_bytes`, cut only between layers."""
    bucket: Named = []
    size, key = 0, None
    for name, tensor in named:
        this_key = layer_key(name)
        if bucket and this_key != key and size + nbytes(tensor) > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes(tensor)
        key = this_key
    if bucket:
        yield bucket


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class SyncStats:
    """What one weight sync moved: bytes and tensors sent to one engine, buckets, seconds."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0

    def add(self, bucket: Named) -> None:
        self.bytes += sum(nbytes(t) for _, t in bucket)
        self.tensors += len(bucket)
        self.buckets += 1

    def stream(self, buckets: Iterable[Named]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of `buckets` one after another, counted as they pass (one engine load takes them
        all in a single pass)."""
        for bucket in buckets:
            self.add(bucket)
            yield from bucket

    def metrics(self) -> dict[str, float]:
        return {
            "sync/bytes": float(self.bytes),
            "sync/buckets": float(self.buckets),
            "sync/tensors": float(self.tensors),
            "sync/seconds": self.seconds,
        }
