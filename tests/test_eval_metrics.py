"""Retrieval metrics against hand-computed values and enumeration (Hit@1 with strict ties, NDCG@5,
chance level, pass@k, the oracle, meta-task means), and the reasoning sensitivity by hand."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ume_r1.data.template import swap_reasoning
from ume_r1.eval.metrics import (
    aggregate,
    chance_level,
    hit_at_1,
    ndcg_at_k,
    oracle,
    pass_at_k,
    pass_at_k_curve,
    pessimistic_ranking,
    reasoning_sensitivity,
)


def test_hit_at_1_hand_cases_and_strict_ties() -> None:
    assert hit_at_1([0.1, 0.9, 0.3], [1]) == 1.0
    assert hit_at_1([0.1, 0.9, 0.3], [2]) == 0.0
    assert hit_at_1([0.1, 0.9, 0.3], [0, 1]) == 1.0  # any relevant item on top is a hit
    # A relevant candidate tied with an irrelevant one loses the tie, whatever the candidate order.
    assert hit_at_1([0.5, 0.5, 0.1], [0]) == 0.0
    assert hit_at_1([0.5, 0.5, 0.1], [1]) == 0.0
    assert hit_at_1([0.5, 0.5, 0.1], [0, 1]) == 1.0  # a tie among relevant items is still a hit
    assert hit_at_1([0.7, 0.7, 0.7], [2]) == 0.0  # collapsed embeddings score 0, not chance
    assert hit_at_1([0.3], [0]) == 1.0


def test_ndcg_at_5_hand_cases() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]  # candidate i has rank i + 1
    assert ndcg_at_k(scores, [0]) == pytest.approx(1.0)
    assert ndcg_at_k(scores, [2]) == pytest.approx(1 / math.log2(4))  # rank 3: 0.5
    # Two relevant at ranks 1 and 3; ideal puts them at ranks 1 and 2.
    assert ndcg_at_k(scores, [0, 2]) == pytest.approx((1 + 1 / 2) / (1 + 1 / math.log2(3)))
    # A relevant item beyond rank 5 adds nothing to DCG but counts in the ideal DCG.
    assert ndcg_at_k(scores, [5]) == 0.0
    assert ndcg_at_k(scores, [1, 5]) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    # More relevant items than k: the ideal DCG is capped at 5 terms, so a full top 5 scores 1.
    assert ndcg_at_k(scores, list(range(7))) == pytest.approx(1.0)
    assert ndcg_at_k(scores, [0, 1, 2, 3, 6]) == pytest.approx(
        sum(1 / math.log2(r + 1) for r in (1, 2, 3, 4)) / sum(1 / math.log2(r + 1) for r in range(1, 6))
    )
    # Ties: the relevant candidate ranks below the irrelevant one it ties with.
    assert pessimistic_ranking([0.5, 0.5, 0.1], [0]) == [1, 0, 2]
    assert ndcg_at_k([0.5, 0.5, 0.1], [0]) == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("metric", ["hit@1", "ndcg@5"])
@pytest.mark.parametrize(("n_candidates", "relevant"), [(4, [1]), (4, [0, 3]), (7, [2, 5, 6])])
def test_chance_level_is_mean_over_all_rankings(metric: str, n_candidates: int, relevant: list[int]) -> None:
    total = 0.0
    perms = list(itertools.permutations(range(n_candidates)))
    for perm in perms:  # scores without ties, every ranking equally likely
        scores = [-float(perm.index(i)) for i in range(n_candidates)]
        total += hit_at_1(scores, relevant) if metric == "hit@1" else ndcg_at_k(scores, relevant)
    assert chance_level(metric, n_candidates, len(relevant)) == pytest.approx(total / len(perms))


def _enumerated_pass_at_k(hits: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(range(len(hits)), k))
    return Fraction(sum(any(hits[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration() -> None:
    for n in range(1, 7):
        for c in range(n + 1):
            hits = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_enumerated_pass_at_k(hits, k)), abs=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # pass@1 is the sample hit rate


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(1000, 500) has ~300 digits; the product form must still match the exact rational value.
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_curve_averages_queries() -> None:
    hits = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    curve = pass_at_k_curve(hits)
    for k in range(1, 5):
        expected = np.mean([float(_enumerated_pass_at_k(list(row), k)) for row in hits])
        assert curve[k - 1] == pytest.approx(expected)
    assert curve[0] == pytest.approx(hits.mean()) and curve == sorted(curve)


def test_oracle_picks_per_instance() -> None:
    disc = [1.0, 0.0, 1.0, 0.0, 0.5]
    gen = [0.0, 1.0, 1.0, 0.0, 0.8]
    picked = oracle(disc, gen)
    assert picked.tolist() == [1.0, 1.0, 1.0, 0.0, 0.8]
    # Better than either mode on average, and better than picking the better mode per dataset.
    assert picked.mean() > max(np.mean(disc), np.mean(gen))


def test_aggregate_meta_task_and_overall_means() -> None:
    out = aggregate({"a": 1.0, "b": 0.0, "c": 1.0}, {"a": "CLS", "b": "CLS", "c": "QA"})
    assert out["meta_tasks"] == {"CLS": 0.5, "QA": 1.0}
    assert out["overall"] == pytest.approx(2 / 3)  # mean over datasets, not over meta-tasks


def test_reasoning_sensitivity_hand_made() -> None:
    assert swap_reasoning("<think>mine</think><answer>a<gen_emb>", "x<think>theirs</think>y") == (
        "<think>theirs</think><answer>a<gen_emb>"
    )
    assert swap_reasoning("no tags", "<think>t</think>") is None
    own = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    swapped = torch.tensor([[1.0, 1.0], [0.0, -1.0], [3.0, 4.0]])
    # cosines: 1/sqrt(2), -1, and a row left out (e.g. its response had no <think>)
    got = reasoning_sensitivity(own, swapped, torch.tensor([True, True, False]))
    assert got == pytest.approx((2**-0.5 - 1) / 2)
    assert math.isnan(reasoning_sensitivity(own, swapped, torch.tensor([False, False, False])))
