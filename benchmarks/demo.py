"""The full CPU demo (recipes/demo.sh) under the memory sampler of grpo_tiny.py: wall time, peak
memory of the whole process tree (Ray included), and the demo's summary table; checks the budget
(<= 20 minutes, <= 6 GB).

    PATH=.venv/bin:$PATH python benchmarks/demo.py [--out runs/demo]
"""

from __future__ import annotations

import argparse
import os
import sys

from grpo_tiny import GB, run_sampled

BUDGET = {"wall_s": 1200.0, "peak_gb": 6.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args()
    env = {**os.environ, "OUT": args.out, "PYTHON": sys.executable, "WANDB_MODE": "offline"}
    rc, wall, sampler = run_sampled(["bash", "recipes/demo.sh"], env)
    peak = sampler.peak_pss / GB
    print(
        f"demo exit {rc}; wall {wall:.0f} s; peak summed PSS {peak:.2f} GB, summed RSS "
        f"{sampler.peak_rss / GB:.2f} GB ({sampler.samples} samples)"
    )
    checks = {
        "wall <= 1200 s": wall <= BUDGET["wall_s"],
        "peak PSS <= 6 GB": peak <= BUDGET["peak_gb"],
        "exit 0": rc == 0,
    }
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
