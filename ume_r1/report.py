"""One table from evaluation runs: disc / gen / oracle Hit@1, chance, format rate and pass@k per stage.

python -m ume_r1.report runs/demo/eval_sft/results.json runs/demo/eval_grpo/results.json --out summary.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, one per stage")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    runs = {stage_name(p): json.loads(p.read_text()) for p in args.results}
    table = summary_table(runs)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
