"""The paper's reward ablation (table 2) from one sweep's run directories: a table and reward curves.

    python -m ume_r1.eval.ablation runs/ablate

reads `eval_sft/results.json` (the SFT checkpoint every run starts from) and, for each reward mode
and seed, `<mode>_seed<k>/metrics.jsonl` (the GRPO run) and `eval_<mode>_seed<k>/results.json`
(its held-out evaluation), as `recipes/ablate.sh` writes them. It prints greedy generative Hit@1
(mean and std over seeds), every seed's paired change against SFT with its standard error, pass@k,
the format rate and the reasoning sensitivity, states whether the issue's goals hold, and writes
`ablation.md` and `reward_curves.png` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ume_r1.eval.report import gen_hits, paired_change, save_figure, write_text

MODES = ("ranking_x_gap", "ranking", "gap", "threshold")  # the paper's row order; rewards/ume.py's names
CURVES = (
    ("reward/embedding", "embedding reward"),
    ("reward/format", "format reward"),
    ("embedding/in_batch_hit@1", "in-batch gen Hit@1"),
)
GOAL_POINTS = 3.0  # the bar: GRPO must lift greedy gen Hit@1 by this much over SFT


@dataclass
class Run:
    mode: str
    seed: int
    results: dict[str, Any]
    metrics: list[dict[str, float]]


def load_runs(root: Path) -> tuple[dict[str, Any], dict[str, list[Run]]]:
    """The SFT evaluation and every finished run under `root`, grouped by reward mode."""
    sft_path = root / "eval_sft" / "results.json"
    if not sft_path.is_file():
        raise FileNotFoundError(f"{sft_path}: no evaluation of the SFT checkpoint")
    runs: dict[str, list[Run]] = {}
    for path in sorted(root.glob("eval_*_seed*/results.json")):
        match = re.fullmatch(r"eval_(.+)_seed(\d+)", path.parent.name)
        metrics_path = root / f"{match[1]}_seed{match[2]}" / "metrics.jsonl" if match else None
        if match is None or metrics_path is None or not metrics_path.is_file():
            continue
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        run = Run(match[1], int(match[2]), json.loads(path.read_text()), metrics)
        runs.setdefault(run.mode, []).append(run)
    if not runs:
        raise FileNotFoundError(
            f"{root}: no eval_<mode>_seed<k>/results.json with its <mode>_seed<k>/metrics.jsonl"
        )
    order = {m: i for i, m in enumerate(MODES)}
    return json.loads(sft_path.read_text()), dict(
        sorted(runs.items(), key=lambda kv: order.get(kv[0], len(order)))
    )


def _gen(results: dict[str, Any]) -> float:
    return 100 * results["overall"]["gen"]


def _pass(results: dict[str, Any]) -> list[float]:
    return [100 * v for v in (results.get("pass_at_k") or {}).get("mean", [])]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def _se(values: np.ndarray) -> float:
    """Standard error of the mean of `values` (nan for fewer than two)."""
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")


@dataclass
class SeedMean:
    """A mean over seeds of paired per-query differences in greedy gen Hit@1 (points), with two standard
    errors: over seeds (the RL stage's own variation between runs; the goals are judged on it) and over
    queries (of the per-query difference averaged over the seeds: the held-out set's sampling noise)."""

    per_seed: dict[int, float]
    se_queries: float
    n_queries: int

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_seed.values())))

    @property
    def se_seeds(self) -> float:
        return _se(np.array(list(self.per_seed.values())))

    def beyond_two_se(self) -> bool:
        return abs(self.mean) > 2 * self.se_seeds


def _paired(hits: dict[int, np.ndarray], baseline: dict[int, np.ndarray]) -> SeedMean:
    """`hits` minus `baseline`, per seed, over the seeds both have."""
    seeds = sorted(set(hits) & set(baseline))
    if not seeds:
        raise ValueError(f"no seed in common between seeds {sorted(hits)} and {sorted(baseline)}")
    diffs = {s: 100 * (hits[s] - baseline[s]) for s in seeds}
    per_query = np.mean([diffs[s] for s in seeds], axis=0)
    return SeedMean({s: float(d.mean()) for s, d in diffs.items()}, _se(per_query), per_query.size)


def _hits(group: list[Run]) -> dict[int, np.ndarray]:
    return {r.seed: gen_hits(r.results) for r in group}


def change_over_seeds(sft: dict[str, Any], group: list[Run]) -> SeedMean:
    """A reward's change against the SFT checkpoint every run started from, per seed and on average."""
    start = gen_hits(sft)
    return _paired(_hits(group), {r.seed: start for r in group})


def difference_over_seeds(a: list[Run], b: list[Run]) -> SeedMean:
    """Reward a minus reward b, paired by seed (the seed fixes the data order and the rollout sampling
    of both) and by query; over the seeds both rewards ran."""
    return _paired(_hits(a), _hits(b))


def changes_table(sft: dict[str, Any], runs: dict[str, list[Run]]) -> str:
    """Every reward's mean change against SFT, and every pair of rewards' difference, with their standard
    errors; a difference is called only beyond two standard errors over seeds."""
    lines = [
        "| reward | seeds | mean change | SE over seeds | SE over queries | per seed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, group in runs.items():
        c = change_over_seeds(sft, group)
        seeds = ", ".join(f"s{s}: {v:+.1f}" for s, v in c.per_seed.items())
        cells = f"{c.mean:+.1f} | {c.se_seeds:.1f} | {c.se_queries:.1f}"
        lines.append(f"| {mode} | {len(c.per_seed)} | {cells} | {seeds} |")
    modes = list(runs)
    lines += [
        "",
        "| difference | common seeds | mean | SE over seeds | SE over queries | beyond 2 SE (seeds) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            d = difference_over_seeds(runs[a], runs[b])
            lines.append(
                f"| {a} - {b} | {len(d.per_seed)} | {d.mean:+.1f} | {d.se_seeds:.1f} | {d.se_queries:.1f} "
                f"| {'yes' if d.beyond_two_se() else 'no'} |"
            )
    lines.append(
        f"\nPoints of greedy gen Hit@1 over {gen_hits(sft).size} held-out queries, paired by query and by"
        " seed."
    )
    return "\n".join(lines) + "\n"


def _sensitivity(results: dict[str, Any]) -> float | None:
    return (results.get("generation") or {}).get("reasoning_sensitivity")


def ablation_table(sft: dict[str, Any], runs: dict[str, list[Run]]) -> str:
    """Paper table 2's shape: one row per reward, mean ± std over seeds, plus each seed's paired change."""
    ks = [k for k in (1, 4, 8) if k <= len(_pass(sft))]
    head = ["reward", "seeds", "gen Hit@1", "change vs SFT, per seed (± SE)", *[f"pass@{k}" for k in ks]]
    head += ["format rate", "reasoning sens."]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---|" + "---:|" * (len(ks) + 2)]

    def row(name: str, group: list[dict[str, Any]], changes: str) -> str:
        sens = [s for s in map(_sensitivity, group) if s is not None]
        cells = [name, str(len(group)), _mean_std([_gen(r) for r in group]), changes]
        cells += [_mean_std([_pass(r)[k - 1] for r in group if len(_pass(r)) >= k]) for k in ks]
        cells += [_mean_std([100 * r["generation"]["format_rate"] for r in group])]
        cells += [f"{np.mean(sens):.3f}" if sens else "-"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("SFT (start)", [sft], "-"))
    for mode, group in runs.items():
        changes = ", ".join(
            f"s{r.seed}: {paired_change(sft, r.results)}" for r in sorted(group, key=lambda r: r.seed)
        )
        lines.append(row(mode, [r.results for r in group], changes))
    n = gen_hits(sft).size
    per_dataset = sft["settings"].get("pass_k_max_queries") or "all"
    lines.append(
        f"\nIn %, means of datasets, {n} held-out queries (pass@k: {per_dataset} per dataset); ± is the std"
    )
    lines.append("over seeds, or the paired standard error of one seed's change in the change column.")
    return "\n".join(lines) + "\n"


def verdict(sft: dict[str, Any], runs: dict[str, list[Run]], main_mode: str = MODES[0]) -> str:
    """The issue's goals, stated plainly from the numbers: the main reward's mean change over seeds is at
    least GOAL_POINTS and beyond two standard errors over seeds; it is at least as good as each of the
    paper's other rewards by the mean; a variant outside the paper's modes gets its paired difference."""
    if main_mode not in runs:
        return f"no {main_mode} runs: no verdict\n"
    change = change_over_seeds(sft, runs[main_mode])
    each = sum(v >= GOAL_POINTS for v in change.per_seed.values())
    met = change.mean >= GOAL_POINTS and change.beyond_two_se()
    lines = [
        f"- goal 1 (GRPO with {main_mode} lifts greedy gen Hit@1 by >= {GOAL_POINTS:g} points over SFT, mean "
        f"over seeds, beyond two SE over seeds): {'MET' if met else 'NOT MET'} (mean change "
        f"{change.mean:+.1f} ± {change.se_seeds:.1f}; {each} of {len(change.per_seed)} seeds reach it alone)"
    ]
    main = np.mean([_gen(r.results) for r in runs[main_mode]])
    for mode, group in runs.items():
        other = np.mean([_gen(r.results) for r in group])
        if mode in MODES and mode != main_mode:  # the paper's ablations
            holds = "holds" if main >= other else "does NOT hold"
            lines.append(f"- goal 2, {main_mode} >= {mode}: {holds} ({main:.1f} vs {other:.1f})")
        elif mode not in MODES:  # a variant of a reward (e.g. the reasoning bonus): its paired difference
            d = difference_over_seeds(group, runs[main_mode])
            called = "beyond" if d.beyond_two_se() else "within"
            lines.append(
                f"- variant {mode} - {main_mode}: {d.mean:+.1f} ± {d.se_seeds:.1f} over {len(d.per_seed)} "
                f"common seeds ({called} two SE)"
            )
    return "\n".join(lines) + "\n"


def plot_reward_curves(runs: dict[str, list[Run]], path: str) -> None:
    """One panel per logged curve: each reward mode's mean over seeds against the step, min..max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for mode, group in runs.items():
            steps = min(len(r.metrics) for r in group)
            if steps == 0:
                continue
            values = np.array([[row.get(key, np.nan) for row in r.metrics[:steps]] for r in group], float)
            x = [row["step"] for row in group[0].metrics[:steps]]
            ax.plot(x, np.nanmean(values, 0), label=mode)
            ax.fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.15)
        ax.set(xlabel="step", title=title)
    axes[0].legend(fontsize=7)
    fig.suptitle("GRPO from one SFT checkpoint: mean over seeds, min..max shaded", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("root", type=Path, help="the sweep's directory (recipes/ablate.sh's OUT)")
    args = parser.parse_args(argv)
    sft, runs = load_runs(args.root)
    text = ablation_table(sft, runs) + "\n" + changes_table(sft, runs) + "\n" + verdict(sft, runs)
    print(text)
    write_text(str(args.root / "ablation.md"), text)
    plot_reward_curves(runs, str(args.root / "reward_curves.png"))
    print(f"wrote {args.root / 'ablation.md'} and {args.root / 'reward_curves.png'}")


if __name__ == "__main__":
    main()
