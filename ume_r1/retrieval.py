"""Hit@1 over candidate pools, and the chance level that goes with it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def hit_at_1(
    queries: torch.Tensor, candidates: torch.Tensor, positive: Sequence[int], pools: Sequence[Sequence[int]]
) -> float:
    """Share of queries whose positive scores strictly above every other candidate of their pool
    (a tie is a miss, so collapsed embeddings score 0, not chance)."""
    hits = 0
    for q, (pos, pool) in enumerate(zip(positive, pools, strict=True)):
        scores = candidates[list(pool)] @ queries[q]
        mine = list(pool).index(pos)
        others = torch.cat([scores[:mine], scores[mine + 1 :]])
        hits += int(len(others) == 0 or bool(scores[mine] > others.max()))
    return hits / max(len(positive), 1)


def chance_hit_at_1(pools: Sequence[Sequence[int]]) -> float:
    return sum(1 / len(p) for p in pools) / max(len(pools), 1)
