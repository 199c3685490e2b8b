"""Evaluation reports: a run's results.json / results.md / plots (written atomically), and one table
across stages (disc / gen / oracle Hit@1, chance, format rate, pass@k):

    python -m ume_r1.eval.report runs/demo/eval_sft/results.json runs/demo/eval_grpo/results.json \
        --out summary.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _atomic(path: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` then rename onto `path`, so a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cosine(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_markdown(results: dict[str, Any]) -> str:
    """Dataset x {disc, gen, oracle, chance} table in percent, meta-task and overall means, pass@k row."""
    cols = [m for m in ("disc", "gen", "oracle", "gen2disc", "disc2gen", "chance") if m in results["scores"]]
    lines = [
        "# UME-R1 retrieval evaluation",
        "",
        f"model: `{results['model']}`  ",
        f"config: `{results['config']}`  ",
        "scores in percent; ties count against the relevant candidate",
        "",
        "| dataset | meta-task | metric | queries | " + " | ".join(cols) + " |",
        "|---|---|---|---:|" + "---:|" * len(cols),
    ]
    for d in results["datasets"]:
        vals = " | ".join(_pct(results["scores"][m][d["name"]]) for m in cols)
        lines.append(f"| {d['name']} | {d['meta_task']} | {d['metric']} | {d['n_queries']} | {vals} |")
    for task in results["meta_tasks"][cols[0]]:
        vals = " | ".join(_pct(results["meta_tasks"][m][task]) for m in cols)
        lines.append(f"| **{task}** (mean) | {task} | | | {vals} |")
    vals = " | ".join(_pct(results["overall"][m]) for m in cols)
    lines.append(f"| **overall** (mean of datasets) | | | | {vals} |")
    pk = results.get("pass_at_k")
    if pk:
        lines += [
            "",
            f"pass@k: generative Hit@1 over n={pk['n']} samples per query, temperature {pk['temperature']}, "
            "unbiased estimator (mean of datasets); mean cosine among a query's samples: "
            f"{_cosine(pk.get('within_query_cosine'))}",
            "",
            "| | " + " | ".join(f"k={k}" for k in pk["k"]) + " |",
            "|---|" + "---:|" * len(pk["k"]),
            "| pass@k | " + " | ".join(_pct(v) for v in pk["mean"]) + " |",
        ]
        lines += [f"| {n} | " + " | ".join(_pct(v) for v in c) + " |" for n, c in pk["per_dataset"].items()]
    gen = results.get("generation")
    if gen:
        lines += [
            "",
            f"format rate (greedy): {_pct(gen['format_rate'])}%; "
            f"responses with <gen_emb>: {_pct(gen['gen_emb_rate'])}%; "
            f"reasoning sensitivity (cosine, 1: the <think> text does not matter): "
            f"{_cosine(gen.get('reasoning_sensitivity'))}",
        ]
    return "\n".join(lines) + "\n"


def save_figure(fig: Any, path: str) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_pass_at_k(results: dict[str, Any], path: str) -> None:
    """pass@k against k: one line per dataset and the mean."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / cluster nodes
    import matplotlib.pyplot as plt

    pk = results["pass_at_k"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in pk["per_dataset"].items():
        ax.plot(pk["k"], [100 * v for v in curve], marker="o", alpha=0.6, label=name)
    ax.plot(pk["k"], [100 * v for v in pk["mean"]], marker="s", color="black", linewidth=2, label="mean")
    ax.set(xlabel="k", ylabel="pass@k (%)", title=f"pass@k, n={pk['n']}, T={pk['temperature']}")
    ax.set_xticks(pk["k"])
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_modes(results: dict[str, Any], path: str) -> None:
    """Grouped bars per meta-task (and overall): disc vs gen vs oracle, with the chance level marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("disc", "gen", "oracle") if m in results["meta_tasks"]]
    groups = [*results["meta_tasks"][modes[0]], "overall"]

    def value(mode: str, group: str) -> float:
        return 100 * (results["overall"][mode] if group == "overall" else results["meta_tasks"][mode][group])

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 3.5))
    width = 0.8 / len(modes)
    x = np.arange(len(groups))
    for i, mode in enumerate(modes):
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, [value(mode, g) for g in groups], width, label=mode)
    ax.scatter(x, [value("chance", g) for g in groups], marker="_", s=400, color="black", label="chance")
    ax.set_xticks(x, groups)
    ax.set(ylabel="score (%)", title="discriminative vs generative vs oracle")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    save_figure(fig, path)


def write_outputs(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """results.json, results.md, modes.png and (with pass@k) pass_at_k.png, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("results.json", "results.md", "modes.png")}
    write_text(paths["results.json"], json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text(paths["results.md"], results_markdown(results))
    plot_modes(results, paths["modes.png"])
    if results.get("pass_at_k"):
        paths["pass_at_k.png"] = os.path.join(out_dir, "pass_at_k.png")
        plot_pass_at_k(results, paths["pass_at_k.png"])
    return paths


def stage_name(path: Path) -> str:
    """`.../eval_sft/results.json` -> `sft`."""
    return path.parent.name.removeprefix("eval_")


def summary_table(runs: dict[str, dict]) -> str:
    n = max((r["pass_at_k"] or {}).get("n", 0) for r in runs.values())
    ks = [k for k in (1, 2, 4, 8, 16) if k <= n]
    head = [
        "after",
        "disc Hit@1",
        "gen Hit@1",
        "oracle Hit@1",
        "chance",
        "format rate",
        *[f"pass@{k}" for k in ks],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, r in runs.items():
        overall, curve = r["overall"], (r["pass_at_k"] or {}).get("mean", [])
        row = [
            stage,
            _pct(overall.get("disc")),
            _pct(overall.get("gen")),
            _pct(overall.get("oracle")),
            _pct(overall.get("chance")),
            _pct((r.get("generation") or {}).get("format_rate")),
            *[_pct(curve[k - 1]) if k <= len(curve) else "-" for k in ks],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\nAll figures in %, means over the evaluation datasets.\n"


def gen_hits(results: dict[str, Any]) -> np.ndarray:
    """Per-query greedy generative hits over all datasets, in the results' dataset order."""
    return np.concatenate(
        [np.asarray(results["per_query"]["gen"][d["name"]], float) for d in results["datasets"]]
    )


@dataclass
class Change:
    """A paired change in greedy gen Hit@1 (points) between two evaluations of the same queries."""

    points: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.points:+.1f} ± {self.se:.1f}"


def paired_change(before: dict[str, Any], after: dict[str, Any]) -> Change:
    """after - before in points, with the standard error of the mean per-query difference."""
    a, b = gen_hits(before), gen_hits(after)
    if a.shape != b.shape:
        raise ValueError(f"the two evaluations cover different queries ({a.size} vs {b.size})")
    diff = 100 * (b - a)
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return Change(float(diff.mean()), se, int(diff.size))


def lift_line(before: str, after: str, runs: dict[str, dict]) -> str:
    """Whether stage `after` lifted greedy generative Hit@1 over stage `before`, said plainly: a lift
    (or a drop) is a paired change beyond two standard errors."""
    change = paired_change(runs[before], runs[after])
    if change.points > 2 * change.se:
        verdict = "lifted generative retrieval"
    elif change.points < -2 * change.se:
        verdict = "did NOT lift generative retrieval: it LOWERED it (beyond two standard errors)"
    else:
        verdict = "did NOT lift generative retrieval (the change is within two standard errors)"
    return (
        f"{after} vs {before}: greedy gen Hit@1 change {change} points (paired SE, {change.n} queries): "
        f"{after} {verdict}.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, one per stage")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    runs = {stage_name(p): json.loads(p.read_text()) for p in args.results}
    table = summary_table(runs)
    stages = list(runs)
    if len(stages) >= 2 and all(r.get("per_query", {}).get("gen") for r in runs.values()):
        table += "\n" + lift_line(stages[0], stages[-1], runs)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
