"""The ablation report and the stage summary's lift line, on hand-made evaluation results: paired
changes and their standard errors against a direct computation, verdicts stated as the numbers say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ume_r1.eval.ablation import (
    ablation_table,
    change_over_seeds,
    changes_table,
    difference_over_seeds,
    load_runs,
    main,
    verdict,
)
from ume_r1.eval.report import lift_line, paired_change
from ume_r1.eval.report import main as report_main


def _results(hits_a: list[int], hits_b: list[int], format_rate: float = 0.9) -> dict:
    """Evaluation results of two datasets with the given per-query greedy gen hits."""
    per_query = {"a": hits_a, "b": hits_b}
    return {
        "datasets": [{"name": "a"}, {"name": "b"}],
        "per_query": {"gen": per_query},
        "overall": {"gen": float(np.mean([np.mean(hits_a), np.mean(hits_b)]))},
        "generation": {"format_rate": format_rate, "reasoning_sensitivity": 0.5},
        "pass_at_k": None,
        "settings": {"pass_k_max_queries": None},
    }


SFT = _results([1, 0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1, 0])


def test_paired_change_is_the_mean_difference_with_its_standard_error() -> None:
    after = _results([1, 1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0, 0, 0])
    before = [1, 0, 0, 0, 1, 0, 0, 0] + [0, 1, 0, 0, 0, 0, 1, 0]
    diff = 100 * (np.array([1, 1, 1, 0, 1, 0, 0, 1] + [0, 1, 1, 0, 0, 0, 0, 0]) - before)
    change = paired_change(SFT, after)
    assert change.n == 16
    assert change.points == pytest.approx(diff.mean())
    assert change.se == pytest.approx(np.std(diff, ddof=1) / math.sqrt(16))
    with pytest.raises(ValueError, match="different queries"):
        paired_change(SFT, _results([1], [0]))


def test_lift_line_says_lifted_only_above_two_standard_errors() -> None:
    lifted = _results([1] * 8, [1] * 7 + [0])  # +9 of 16 queries, one loss: far above 2 SE
    flat = _results([0, 1, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1, 0])  # one query swaps a hit for a miss
    assert "grpo lifted" in lift_line("sft", "grpo", {"sft": SFT, "grpo": lifted})
    line = lift_line("sft", "grpo", {"sft": SFT, "grpo": flat})
    assert "did NOT lift" in line and "+0.0" in line and "within two standard errors" in line
    runs = {"sft": _results([1] * 8, [1] * 7 + [0]), "grpo": _results([0] * 8, [0] * 8)}
    assert "it LOWERED it" in lift_line("sft", "grpo", runs)


def _write_sweep(root: Path, seeds_hits: dict[str, list[tuple[list[int], list[int]]]]) -> None:
    (root / "eval_sft").mkdir(parents=True)
    (root / "eval_sft" / "results.json").write_text(json.dumps(SFT))
    for mode, runs in seeds_hits.items():
        for seed, (a, b) in enumerate(runs, start=1):
            (root / f"eval_{mode}_seed{seed}").mkdir()
            (root / f"eval_{mode}_seed{seed}" / "results.json").write_text(json.dumps(_results(a, b)))
            (root / f"{mode}_seed{seed}").mkdir()
            rows = [{"step": s, "reward/embedding": 0.1 * s, "reward/format": 0.5} for s in (1, 2, 3)]
            (root / f"{mode}_seed{seed}" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (root / "gap_seed9").mkdir()  # a run that never finished evaluating is left out


def test_ablation_table_verdict_and_outputs(tmp_path: Path, capsys) -> None:
    up = ([1, 1, 1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 0, 1, 0])  # +5 of 16: +31.2 points
    up4 = ([1, 1, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 0])  # +4 of 16: +25.0 points
    same = (SFT["per_query"]["gen"]["a"], SFT["per_query"]["gen"]["b"])
    _write_sweep(tmp_path, {"gap": [same, same], "ranking_x_gap": [up, up, same]})
    sft, runs = load_runs(tmp_path)
    assert list(runs) == ["ranking_x_gap", "gap"]  # the paper's row order, not the file order
    assert [r.seed for r in runs["ranking_x_gap"]] == [1, 2, 3] and len(runs["gap"]) == 2

    table = ablation_table(sft, runs)
    change = paired_change(SFT, _results(*up))
    assert change.points == pytest.approx(31.25)
    assert f"s1: {change}, s2: {change}, s3: +0.0 ± 0.0" in table
    mean_gen = [100 * _results(*up)["overall"]["gen"]] * 2 + [100 * SFT["overall"]["gen"]]
    assert f"{np.mean(mean_gen):.1f} ± {np.std(mean_gen, ddof=1):.1f}" in table

    # +31.25, +31.25, 0: mean +20.8, SE over seeds 10.4, so not beyond two SE
    said = verdict(sft, runs)
    assert "): NOT MET (mean change +20.8 ± 10.4; 2 of 3 seeds reach it alone)" in said
    assert "ranking_x_gap >= gap: holds" in said
    runs["ranking_x_gap"][2].results = _results(*up4)  # +31.25, +31.25, +25: mean +29.2 ± 2.1
    assert "): MET (mean change +29.2 ± 2.1; 3 of 3 seeds reach it alone)" in verdict(sft, runs)
    runs["ranking_x_gap"] = runs["gap"]  # two seeds without a change
    assert "): NOT MET (mean change +0.0 ± 0.0; 0 of 2 seeds reach it alone)" in verdict(sft, runs)
    assert "ranking_x_gap >= gap: holds (25.0 vs 25.0)" in verdict(sft, runs)
    runs["gap"] = [runs["gap"][0], *load_runs(tmp_path)[1]["ranking_x_gap"][:1]]
    assert "ranking_x_gap >= gap: does NOT hold" in verdict(sft, runs)
    # a variant outside the paper's modes (the reasoning bonus) is no ablation: its paired difference
    runs["ranking_x_gap_bonus"] = load_runs(tmp_path)[1]["ranking_x_gap"]  # +31.25, +31.25, 0 vs 0, 0
    said = verdict(sft, runs)
    assert "ranking_x_gap >= ranking_x_gap_bonus" not in said
    d = np.array([31.25, 31.25])  # the two common seeds' differences
    se = np.std(d, ddof=1) / math.sqrt(2)
    line = f"- variant ranking_x_gap_bonus - ranking_x_gap: {d.mean():+.1f} ± {se:.1f} over 2 common seeds"
    assert line in said

    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| ranking_x_gap | 3 |" in out and "| ranking_x_gap - gap | 2 |" in out
    assert (tmp_path / "ablation.md").read_text().startswith("| reward |")
    assert (tmp_path / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changes_and_differences_over_seeds_equal_a_direct_computation(tmp_path: Path) -> None:
    """Per-seed changes, their mean and both standard errors, and the seed- and query-paired difference
    between two rewards (over the seeds both ran), against numpy on random hits."""
    rng = np.random.default_rng(0)
    draw = lambda: (rng.integers(0, 2, 8).tolist(), rng.integers(0, 2, 8).tolist())  # noqa: E731
    _write_sweep(tmp_path, {"ranking_x_gap": [draw() for _ in range(5)], "gap": [draw() for _ in range(3)]})
    sft, runs = load_runs(tmp_path)
    start = np.array(SFT["per_query"]["gen"]["a"] + SFT["per_query"]["gen"]["b"], float)

    def hits(mode: str) -> dict[int, np.ndarray]:
        return {
            r.seed: np.array(r.results["per_query"]["gen"]["a"] + r.results["per_query"]["gen"]["b"])
            for r in runs[mode]
        }

    main_hits, gap_hits = hits("ranking_x_gap"), hits("gap")
    per_seed = np.array([100 * (main_hits[s] - start).mean() for s in range(1, 6)])
    change = change_over_seeds(sft, runs["ranking_x_gap"])
    assert list(change.per_seed) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(list(change.per_seed.values()), per_seed)
    assert change.mean == pytest.approx(per_seed.mean())
    assert change.se_seeds == pytest.approx(per_seed.std(ddof=1) / math.sqrt(5))
    per_query = np.mean([100 * (main_hits[s] - start) for s in range(1, 6)], axis=0)
    assert (
        change.se_queries == pytest.approx(per_query.std(ddof=1) / math.sqrt(16)) and change.n_queries == 16
    )

    diff = difference_over_seeds(runs["ranking_x_gap"], runs["gap"])
    assert list(diff.per_seed) == [1, 2, 3]  # only the seeds both rewards ran
    d = np.array([100 * (main_hits[s] - gap_hits[s]).mean() for s in (1, 2, 3)])
    assert diff.mean == pytest.approx(d.mean())
    assert diff.se_seeds == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    d_query = np.mean([100 * (main_hits[s] - gap_hits[s]) for s in (1, 2, 3)], axis=0)
    assert diff.se_queries == pytest.approx(d_query.std(ddof=1) / math.sqrt(16))
    assert diff.beyond_two_se() == (abs(d.mean()) > 2 * d.std(ddof=1) / math.sqrt(3))

    table = changes_table(sft, runs)
    assert (
        f"| ranking_x_gap | 5 | {per_seed.mean():+.1f} | {change.se_seeds:.1f} | {change.se_queries:.1f} |"
        in table
    )
    assert f"| ranking_x_gap - gap | 3 | {d.mean():+.1f} | {diff.se_seeds:.1f} |" in table
    with pytest.raises(ValueError, match="no seed in common"):
        difference_over_seeds(runs["ranking_x_gap"][3:], runs["gap"])


def test_stage_summary_ends_with_the_lift_line(tmp_path: Path, capsys) -> None:
    paths = []
    for stage, results in (("sft", SFT), ("grpo", _results([1] * 8, [1] * 8))):
        (tmp_path / f"eval_{stage}").mkdir()
        paths.append(tmp_path / f"eval_{stage}" / "results.json")
        paths[-1].write_text(json.dumps(results))
    report_main([str(p) for p in paths] + ["--out", str(tmp_path / "summary.md")])
    summary = (tmp_path / "summary.md").read_text()
    assert "| sft |" in summary and "| grpo |" in summary
    assert summary.rstrip().endswith("grpo lifted generative retrieval.")
    assert summary in capsys.readouterr().out
