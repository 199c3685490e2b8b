"""Retrieval metrics with the MMEB-V2 (VLM2Vec) definitions, the oracle, and pass@k.

Per query, the candidates are ranked by cosine similarity with the query and the relevant ones are
given by their indices (``labels``):

* Hit@1: 1 if the top-ranked candidate is relevant, else 0.
* NDCG@k: binary relevance, ``DCG = sum_{r<=k} rel_r / log2(r + 1)``, ideal DCG from
  ``min(#relevant, k)`` relevant items at the top (VLM2Vec ``RankingMetrics.ndcg_at_k``, linear gain).

Ties: VLM2Vec ranks by ``argsort`` so a tie falls wherever the sort puts it. Here ties are broken
against the relevant candidates (an irrelevant candidate with the same score ranks first):
collapsed embeddings (every score equal) then score 0, not chance, and
results do not depend on candidate order. For Hit@1 this means: hit iff the best relevant score is
strictly above every irrelevant score.

Scores are fractions in [0, 1]; per-dataset scores are means over queries, a meta-task's score is the
mean of its datasets' scores and the overall score is the mean over datasets (MMEB's "ALL" column).

Two diagnostics of generative embeddings serve the evaluation and GRPO's step metrics alike: the
within-group cosine (are a prompt's samples collapsed?) and the reasoning sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("hit@1", "ndcg@5")
Scores = Sequence[float] | np.ndarray | torch.Tensor  # one query's similarity to each candidate


def pessimistic_ranking(scores: Scores, labels: Sequence[int]) -> list[int]:
    """Candidate indices best first; among equal scores irrelevant candidates come first, then by index."""
    values = torch.as_tensor(scores).tolist()
    relevant = set(labels)
    return sorted(range(len(values)), key=lambda i: (-values[i], i in relevant, i))


def hit_at_1(scores: Scores, labels: Sequence[int]) -> float:
    """1.0 if the top candidate (ties against the relevant ones) is relevant."""
    return float(pessimistic_ranking(scores, labels)[0] in set(labels))


def ndcg_at_k(scores: Scores, labels: Sequence[int], k: int = 5) -> float:
    """Binary-relevance NDCG@k with the log2(rank + 1) discount; ideal DCG uses min(#relevant, k) hits."""
    relevant = set(labels)
    ranked = pessimistic_ranking(scores, labels)[:k]
    dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(ranked) if i in relevant)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return dcg / idcg


def instance_score(metric: str, scores: Scores, labels: Sequence[int]) -> float:
    """One query's score under `metric` ("hit@1" or "ndcg@5")."""
    if metric == "hit@1":
        return hit_at_1(scores, labels)
    if metric == "ndcg@5":
        return ndcg_at_k(scores, labels, 5)
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


def chance_level(metric: str, n_candidates: int, n_relevant: int) -> float:
    """Expected score of a uniformly random ranking (no ties) of `n_candidates` with `n_relevant` relevant:
    each rank holds a relevant item with probability n_relevant / n_candidates."""
    if metric == "hit@1":
        return n_relevant / n_candidates
    if metric == "ndcg@5":
        k = 5
        dcg = sum(n_relevant / n_candidates / math.log2(r + 2) for r in range(min(k, n_candidates)))
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(n_relevant, k)))
        return dcg / idcg
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


def oracle(*per_instance: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per query, the best of the modes' scores (paper 4.2: the oracle picks the better embedding per
    instance); average the result for the dataset score."""
    return np.max(np.stack([np.asarray(s, dtype=float) for s in per_instance]), axis=0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021; Brown et al. 2024): 1 - C(n-c, k) / C(n, k), in the product
    form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` that never forms huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a hit
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_curve(hits: Sequence[Sequence[bool]] | np.ndarray) -> list[float]:
    """Mean pass@k over queries for k = 1..n, from a (queries, n samples) array of per-sample hits."""
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 2 or hits.shape[1] == 0:
        raise ValueError(f"hits must be (queries, n >= 1), got shape {hits.shape}")
    n = hits.shape[1]
    counts = hits.sum(axis=1).tolist()
    return [float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in range(1, n + 1)]


def mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of a sequence; NaN for an empty one (a dataset with no queries has no score)."""
    return float(np.mean(values)) if len(values) else float("nan")


def aggregate(per_dataset: Mapping[str, float], meta_task: Mapping[str, str]) -> dict[str, object]:
    """Per-meta-task means of dataset scores (in order of first appearance) and the overall mean."""
    groups: dict[str, list[float]] = {}
    for name, score in per_dataset.items():
        groups.setdefault(meta_task[name], []).append(score)
    return {
        "meta_tasks": {task: mean(scores) for task, scores in groups.items()},
        "overall": mean(list(per_dataset.values())),
    }


def within_group_cosine(embeddings: torch.Tensor, prompt_index: torch.Tensor) -> float:
    """Mean pairwise cosine among the G embeddings of one prompt, averaged over prompts (1 = collapsed)."""
    values = []
    for p in prompt_index.unique():
        group = embeddings[prompt_index == p]
        g = len(group)
        if g > 1:
            sims = group @ group.T
            values.append(float((sims.sum() - sims.diagonal().sum()) / (g * (g - 1))))
    return sum(values) / max(len(values), 1)


def reasoning_sensitivity(embeddings: torch.Tensor, swapped: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean cosine between each response's generative embedding and that of the same response with its
    <think> text taken from another input's response (1: the reasoning does not matter), over `valid`."""
    cos = F.cosine_similarity(embeddings.float(), swapped.float(), dim=-1)
    return float(cos[valid].mean()) if bool(valid.any()) else float("nan")
