"""CPU benchmark of the GRPO loop at `profile=tiny`: wall time, peak memory of the whole process tree
(the recipe, its descendants and the Ray processes it starts), per-stage step times and the reward
curve; checks the budget (>= 30 steps, <= 600 s, <= 6 GB peak) and exits non-zero if it is missed.

    PATH=.venv/bin:$PATH python benchmarks/grpo_tiny.py [--steps N] [--extra key=value ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "rollout", "forward", "reward", "update", "sync")
CURVE = ("reward/reward", "reward/format", "reward/ranking", "reward/gap", "embedding/in_batch_hit@1")
BUDGET = {"steps": 30, "wall_s": 600.0, "peak_gb": 6.0}
GB = 1024**3
SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def label(p: psutil.Process) -> str:
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):  # Ray workers retitle themselves ray::ActorName
        return cmd[0].split()[0]
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))[:60] or p.name()


class TreeSampler(threading.Thread):
    """Every `interval` s: RSS and PSS summed over the root's descendants plus the processes (and their
    children) of the Ray session(s) the root started, born after `since`, even if re-parented away
    from the driver. Ray processes of other sessions (concurrent runs) are counted apart, not summed."""

    def __init__(self, root: psutil.Process, since: float, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.since, self.interval = root, since, interval
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_single_rss = 0
        self.peak_single_name = ""
        self.top_at_peak: list[tuple[str, int]] = []  # (process, pss) at the peak summed PSS
        self.samples = 0
        self.sessions: set[str] = set()  # Ray session names seen in our own tree
        self.foreign: set[int] = set()  # Ray processes of other sessions, left out

    def tree(self) -> list[psutil.Process]:
        procs = {self.root.pid: self.root}
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update({p.pid: p for p in self.root.children(recursive=True)})
        for p in list(procs.values()):  # gcs_server, raylet, agents name their session on the command line
            with contextlib.suppress(psutil.Error):
                self.sessions.update(SESSION.findall(" ".join(p.cmdline())))
        for p in psutil.process_iter(["cmdline", "create_time"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid in procs or "ray" not in cmd or (p.info["create_time"] or 0) < self.since:
                continue
            if not any(s in cmd for s in self.sessions):  # a concurrent run's Ray, not ours
                self.foreign.add(p.pid)
                continue
            procs[p.pid] = p  # re-parented away from the driver: take it and its workers
            with contextlib.suppress(psutil.Error):
                procs.update({c.pid: c for c in p.children(recursive=True)})
        self.foreign -= procs.keys()
        return list(procs.values())

    def sample(self) -> None:
        rows: list[tuple[str, int, int]] = []
        for p in self.tree():
            try:
                mem = p.memory_full_info()
                rows.append((label(p), mem.rss, mem.pss))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.samples += 1
        self.peak_rss = max(self.peak_rss, sum(r[1] for r in rows))
        if (pss := sum(r[2] for r in rows)) > self.peak_pss:
            self.peak_pss, self.top_at_peak = pss, sorted(((n, s) for n, _, s in rows), key=lambda r: -r[1])
        for name, rss, _ in rows:
            if rss > self.peak_single_rss:
                self.peak_single_rss, self.peak_single_name = rss, name

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()


def mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[int, float, TreeSampler]:
    """Run `cmd` from the repo root under a TreeSampler: exit code, wall seconds, the sampler."""
    since = time.time() - 1.0  # create_time has ~10 ms resolution; Ray can't start in the first second
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    sampler = TreeSampler(psutil.Process(proc.pid), since)
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    sampler.stop_event.set()
    sampler.join()
    return rc, wall, sampler


def median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="total_training_steps (default: the profile's)")
    ap.add_argument("--out-dir", type=Path, default=None, help="run directory (default: a fresh temp dir)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides, key=value")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()

    out = (args.out_dir or Path(tempfile.mkdtemp(prefix="grpo_tiny_"))).resolve()
    cmd = ["bash", "recipes/ume_r1_grpo.sh", "profile=tiny", f"trainer.default_local_dir={out}"]
    cmd += [f"trainer.total_training_steps={args.steps}"] if args.steps is not None else []
    cmd += args.extra
    print("$", " ".join(cmd), flush=True)
    rc, wall, sampler = run_sampled(cmd, {**os.environ, "WANDB_MODE": "offline"})

    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    n = len(rows)
    k = max(1, n // 5)
    step_med = median(rows, "timing_s/step")
    summary = {
        "returncode": rc,
        "out_dir": str(out),
        "steps": n,
        "wall_s": wall,
        "peak_rss_sum_gb": sampler.peak_rss / GB,
        "peak_pss_sum_gb": sampler.peak_pss / GB,
        "peak_single_rss_gb": sampler.peak_single_rss / GB,
        "peak_single_process": sampler.peak_single_name,
        "memory_samples": sampler.samples,
        "ray_sessions": sorted(sampler.sessions),
        "foreign_ray_processes_ignored": len(sampler.foreign),
        "top_pss_at_peak_gb": [(name, s / GB) for name, s in sampler.top_at_peak[:10]],
        "median_step_s": step_med,
        "median_stage_s": {s: median(rows, f"timing_s/{s}") for s in STAGES},
        "median_rollout_tokens_per_s": median(rows, "rollout/tokens_per_s"),
        "median_perf_tokens_per_s": median(rows, "perf/tokens_per_s"),
        "curve": {c: (mean(rows[:k], c), mean(rows[-k:], c)) for c in CURVE},
        "final_checkpoint": (out / "final").is_dir(),
    }
    print(f"\n=== GRPO tiny benchmark ({out}) ===")
    print(f"returncode {rc}, steps {n}, wall {wall:.1f} s, final checkpoint {summary['final_checkpoint']}")
    print(
        f"peak memory ({sampler.samples} samples @0.2s): summed PSS {summary['peak_pss_sum_gb']:.2f} GB, "
        f"summed RSS {summary['peak_rss_sum_gb']:.2f} GB, single process RSS "
        f"{summary['peak_single_rss_gb']:.2f} GB ({sampler.peak_single_name})"
    )
    print(
        f"Ray session(s) counted: {', '.join(sorted(sampler.sessions)) or 'none'}; "
        f"left out {len(sampler.foreign)} Ray processes of other (concurrent) sessions"
    )
    print("processes at the PSS peak (GB):")
    for name, pss in sampler.top_at_peak[:10]:
        print(f"  {pss / GB:5.2f}  {name}")
    print(f"median step {step_med:.2f} s; median stage time (share of the median step):")
    for s, t in summary["median_stage_s"].items():
        print(f"  {s:<8} {t:7.3f} s  {100 * t / step_med:5.1f} %")
    print(
        f"median tokens/s: rollout {summary['median_rollout_tokens_per_s']:.1f}, "
        f"whole step {summary['median_perf_tokens_per_s']:.1f}"
    )
    print(f"curve: mean over first {k} vs last {k} steps")
    for c, (first, last) in summary["curve"].items():
        print(f"  {c:<26} {first:8.4f} -> {last:8.4f}  ({last - first:+.4f})")
    checks = {
        f"steps >= {BUDGET['steps']}": n >= BUDGET["steps"],
        f"wall <= {BUDGET['wall_s']:.0f} s": wall <= BUDGET["wall_s"],
        f"peak summed PSS <= {BUDGET['peak_gb']:.0f} GB": summary["peak_pss_sum_gb"] <= BUDGET["peak_gb"],
        "run exited 0": rc == 0,
    }
    summary["checks"] = checks
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
