"""Size and save/load time of a training-state checkpoint (ume_r1.training.checkpoint: DCP-sharded model and
AdamW state of an FSDP2 policy, one gloo rank on CPU), beside the HF export of the same weights.

Models: the tiny test model, and random Qwen2-VL-2B shapes (real vocabulary 151,936, hidden 1536)
cut to 1 and 2 decoder layers: the per-layer difference extrapolates to the full 28 layers. Each
model runs in a fresh process; times are medians of `--repeats` runs into a fresh directory.

    PATH=.venv/bin:$PATH python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ["tiny", "2b-1-layer", "2b-2-layers"]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, repeats: int, root: Path) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from ume_r1.model.hf_checkpoint import load_model
    from ume_r1.model.policy import EmbeddingPolicy
    from ume_r1.model.tiny import build_tiny_model
    from ume_r1.training.checkpoint import load_sharded, save_sharded
    from ume_r1.training.fsdp import init_distributed, save_hf_checkpoint, shard

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = None
    if name == "tiny":
        source = build_tiny_model(root / "tiny-source")
        model, tokenizer = load_model(source)
    else:
        from qwen2_vl_shapes import cut_2b

        source = None
        model, _ = cut_2b(layers=int(name.split("-")[1]))
    init_distributed(torch.device("cpu"))
    policy = shard(EmbeddingPolicy(model, gen_emb_id=5), init_device_mesh("cpu", (1,)), torch.float32)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    for p in params:  # one step, so the optimizer holds its two moments
        p.grad = torch.ones_like(p)
    optimizer.step()

    saves, loads = [], []
    for i in range(repeats):
        path = root / f"{name}-{i}"
        start = time.perf_counter()
        save_sharded(path, policy, optimizer)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_sharded(path, policy, optimizer)
        loads.append(time.perf_counter() - start)
        size = du(path)
        shutil.rmtree(path)
    result = {
        "model": name,
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "checkpoint_MB": size / 2**20,
        "bytes_per_param": size / sum(p.numel() for p in policy.parameters()),
        "save_s": statistics.median(saves),
        "load_s": statistics.median(loads),
        "save_MB_per_s": size / 2**20 / statistics.median(saves),
    }
    if tokenizer is not None:  # the HF export of the same weights, for scale
        start = time.perf_counter()
        save_hf_checkpoint(policy, tokenizer, source, str(root / "hf"))
        result["hf_export_s"] = time.perf_counter() - start
        result["hf_export_MB"] = du(root / "hf") / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)  # one model, in this process
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    if args.model:
        print(json.dumps(measure(args.model, args.repeats, root / args.model)))
        return
    print(f"load average {os.getloadavg()[0]:.2f}; writing under {root}")
    rows = []
    for name in MODELS:
        out = subprocess.run(
            [sys.executable, __file__, "--model", name, "--repeats", str(args.repeats), "--dir", str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shutil.rmtree(root, ignore_errors=True)
    print(f"{'model':<14}{'params M':>10}{'ckpt MB':>10}{'B/param':>9}{'save s':>9}{'load s':>9}{'MB/s':>8}")
    for r in rows:
        print(
            f"{r['model']:<14}{r['params_M']:>10.1f}{r['checkpoint_MB']:>10.1f}{r['bytes_per_param']:>9.1f}"
            f"{r['save_s']:>9.2f}{r['load_s']:>9.2f}{r['save_MB_per_s']:>8.0f}"
        )
    one, two = rows[1], rows[2]
    per_layer = {k: two[k] - one[k] for k in ("checkpoint_MB", "save_s", "load_s")}
    full = {k: one[k] + 27 * v for k, v in per_layer.items()}  # 28 layers; vision tower not included
    print(
        f"per 2B decoder layer: {per_layer['checkpoint_MB']:.0f} MB, save {per_layer['save_s']:.2f} s, "
        f"load {per_layer['load_s']:.2f} s; 28 layers (language model): about "
        f"{full['checkpoint_MB'] / 1024:.1f} GB, save {full['save_s']:.0f} s, load {full['load_s']:.0f} s "
        "on one CPU rank"
    )
    tiny = rows[0]
    print(f"tiny HF export: {tiny['hf_export_MB']:.2f} MB in {tiny['hf_export_s']:.2f} s")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
