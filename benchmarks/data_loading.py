"""Time to the first training step and peak memory on a large data set: media kept as references and
decoded per batch in DataLoader workers (this tree) against the loader that decoded every image at
load (commit OLD, run from a git worktree of it).

The script writes a synthetic SFT set of `--rows` JSON Lines rows (default 200,000), each query with
an image path; `--images` distinct 256 x 256 JPEG files are shared by all rows. Each run is
`python -m sft.train profile=sft_tiny` (the tiny model, one process, the profile's one data worker) on
that file for 2 steps, sampled every 0.2 s: seconds until the first step's metrics row is written, the
trainer process's peak RSS, and the process tree's peak summed PSS (trainer plus data workers). A run
is stopped once it passes `--cap-s` seconds or `--cap-gb` of RSS. Old and new runs alternate; medians.

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/data_loading.py [--rows 200000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from grpo_tiny import TreeSampler  # noqa: E402

from ume_r1.data.template import assistant_text

REPO = Path(__file__).resolve().parent.parent
OLD = "66e1f43"  # the last commit whose loaders decoded every image at load
GB = 1024**3
GOAL = {"first_step_s": 60.0, "peak_rss_gb": 2.0}


def write_set(root: Path, rows: int, images: int, seed: int = 0) -> Path:
    path = root / f"sft_{rows}.jsonl"
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for k in range(images):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((256, 256), Image.BICUBIC).save(root / "imgs" / f"{k}.jpg", quality=90)
    response = assistant_text("the image shows a shape; count its corners", "a shape")
    with open(path.with_suffix(".tmp"), "w") as f:
        for i in range(rows):
            row = {
                "query": {"text": f"describe image {i}", "images": [{"path": f"imgs/{i % images}.jpg"}]},
                "query_response": response,
                "positive": {"text": f"caption {i % 997}: a shape with {i % 7 + 3} corners"},
                "positive_response": response,
                "task": "caption",
            }
            f.write(json.dumps(row) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def old_tree(root: Path) -> Path:
    tree = root / f"old-{OLD}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), OLD], cwd=REPO, check=True)
    return tree


def run(code: Path, data: Path, model: Path, out: Path, cap_s: float, cap_gb: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "sft.train",
        "profile=sft_tiny",
        f"model.path={model}",
        f"data.train_files={data}",
        "data.test_files=null",
        "train.total_steps=2",
        "train.save_freq=-1",
        "train.resume_mode=disable",
        f"output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": "offline"}
    since = time.time() - 1.0
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sampler = TreeSampler(psutil.Process(proc.pid), since)
    sampler.start()
    main_peak, first_step, stopped = 0, None, ""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.2)
        with contextlib.suppress(psutil.Error):
            main_peak = max(main_peak, psutil.Process(proc.pid).memory_info().rss)
        if first_step is None and metrics.is_file() and metrics.read_text().strip():
            first_step = time.perf_counter() - start
        elapsed = time.perf_counter() - start
        if elapsed > cap_s or main_peak > cap_gb * GB:
            stopped = f"stopped at {elapsed:.0f} s, {main_peak / GB:.2f} GB RSS, no step yet" * (
                first_step is None
            )
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            break
    stderr = proc.communicate()[1]
    sampler.stop_event.set()
    sampler.join()
    if proc.returncode not in (0, -9) or (proc.returncode == -9 and not stopped and first_step is None):
        raise RuntimeError(f"{code}: exit {proc.returncode}\n{stderr[-2000:]}")
    return {
        "first_step_s": first_step,
        "peak_rss_gb": main_peak / GB,
        "tree_pss_gb": sampler.peak_pss / GB,
        "stopped": stopped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--small-rows", type=int, default=10_000, help="a set the old loader can finish")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cap-s", type=float, default=240.0)
    parser.add_argument("--cap-gb", type=float, default=6.0)
    parser.add_argument("--dir", default="/tmp/ume-data-bench")
    parser.add_argument("--model", default=str(REPO / "artifacts" / "tiny-qwen2-vl"))
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} cores", flush=True)
    old = old_tree(root)
    ok = True
    for rows in (args.small_rows, args.rows):
        data = write_set(root, rows, args.images)
        results: dict[str, list[dict]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for name, code in (("new", REPO), ("old", old)):
                results[name].append(
                    run(code, data, Path(args.model), root / f"run-{name}", args.cap_s, args.cap_gb)
                )
                print(f"{rows} rows, {name}: {results[name][-1]}", flush=True)
        print(
            f"\n{rows:,} rows ({data.stat().st_size / 1e6:.0f} MB JSONL, {args.images} shared 256x256 JPEGs)"
        )
        print("| loader | first step (s) | trainer peak RSS (GB) | tree peak PSS (GB) | note |")
        print("|---|---|---|---|---|")
        for name, runs in results.items():
            steps = [r["first_step_s"] for r in runs if r["first_step_s"] is not None]
            first = f"{statistics.median(steps):.1f}" if len(steps) == len(runs) else "none"
            rss = statistics.median(r["peak_rss_gb"] for r in runs)
            pss = statistics.median(r["tree_pss_gb"] for r in runs)
            note = "; ".join(sorted({r["stopped"] for r in runs if r["stopped"]}))
            print(f"| {name} | {first} | {rss:.2f} | {pss:.2f} | {note} |")
            if name == "new" and rows == args.rows:
                ok = len(steps) == len(runs) and max(steps) < GOAL["first_step_s"]
                ok = ok and max(r["peak_rss_gb"] for r in runs) < GOAL["peak_rss_gb"]
        print(flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print(
        f"goal (new, {args.rows:,} rows): first step < {GOAL['first_step_s']:.0f} s and peak RSS < "
        f"{GOAL['peak_rss_gb']:.0f} GB: {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
