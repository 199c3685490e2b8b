"""Rollout engines and layouts, measured side by side on this machine (issue 7's figures).

1. `throughput`: rollout tokens/s of `hf` vs `vllm` in one process on the same prompts (synthetic
   image queries, G=8), at 32 and 256 new tokens; the engines run alternately, medians over rounds.
2. `layouts`: the tiny GRPO recipe with hf / vllm in the standalone (2 rollout workers) and hybrid
   layouts, alternately: median step time and its split, weight-sync bytes and seconds per step.
3. `sizes`: weight-sync bytes per step at Qwen2-VL-2B and -7B shapes (parameters counted on meta
   models of the published configs): the old full fp32 state dict via the driver vs bf16 buckets of
   the trainable parameters.

    PATH=.venv/bin:$PATH python benchmarks/rollout_engines.py [throughput] [layouts] [sizes] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_tiny import STAGES, median, run_sampled  # noqa: E402

from ume_r1.model.qwen2_vl import SHAPES  # noqa: E402

GB = 1e9


def load_line() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def throughput(rounds: int, work: Path) -> None:
    import torch

    from ume_r1.data.processor import UMEProcessor
    from ume_r1.data.rl_rows import load_examples
    from ume_r1.model.tiny import build_tiny_model
    from ume_r1.rollout.factory import make_engine, rollout_config
    from ume_r1.synthetic.shapes import make_synthetic

    model = build_tiny_model(work / "tiny", seed=0)
    data = make_synthetic(str(work / "synthetic"), seed=0, n_train=16, n_test=4)
    processor = UMEProcessor.from_pretrained(model)
    examples, _ = load_examples(data["train"])
    prompts = [processor.encode(ex.query) for ex in examples]
    engines = {}
    for name in ("hf", "vllm"):
        cfg = rollout_config(
            name=name, response_length=256, micro_batch_size=16, enforce_eager=True, cpu_kvcache_space_gb=1
        )
        engines[name] = (cfg, make_engine(cfg, model, torch.device("cpu"), torch.float32))
    results: dict[tuple[str, int], list[float]] = {}
    lengths: dict[tuple[str, int], list[float]] = {}
    for length in (32, 256):
        for cfg, engine in engines.values():  # warm-up (first-call compilation, caches)
            cfg.response_length = length
            engine.generate(prompts[:2], n=2, seed=0)
        for r in range(rounds):
            for name, (cfg, engine) in engines.items():
                cfg.response_length = length
                start = time.perf_counter()
                groups = engine.generate(prompts, n=8, seed=100 + r)
                seconds = time.perf_counter() - start
                tokens = sum(len(x) for g in groups for x in g)
                results.setdefault((name, length), []).append(tokens / seconds)
                lengths.setdefault((name, length), []).append(tokens / (len(prompts) * 8))
    print(
        f"\n== rollout throughput: {len(prompts)} image prompts x G=8, fp32 CPU, {rounds} rounds "
        f"({load_line()})"
    )
    for length in (32, 256):
        hf, vl = statistics.median(results[("hf", length)]), statistics.median(results[("vllm", length)])
        hf_len, vl_len = statistics.mean(lengths[("hf", length)]), statistics.mean(lengths[("vllm", length)])
        print(
            f"  max {length:>3} new tokens: hf {hf:8.0f} tok/s (mean length {hf_len:.0f})"
            f" | vllm {vl:8.0f} tok/s (mean length {vl_len:.0f})"
            f" | vllm/hf {vl / hf:.2f}x   rounds hf {[round(x) for x in results[('hf', length)]]}"
            f" vllm {[round(x) for x in results[('vllm', length)]]}"
        )


LAYOUTS = {
    "hf standalone x2": ["rollout.name=hf", "trainer.hybrid_engine=false", "rollout.num_workers=2"],
    "hf hybrid": ["rollout.name=hf", "trainer.hybrid_engine=true"],
    "vllm standalone x2": ["rollout.name=vllm", "trainer.hybrid_engine=false", "rollout.num_workers=2"],
    "vllm hybrid": ["rollout.name=vllm", "trainer.hybrid_engine=true"],
}


def layouts(rounds: int, steps: int, work: Path, extra: list[str]) -> None:
    model, data = work / "tiny", work / "synthetic"
    if not (model / "config.json").is_file():
        from ume_r1.model.tiny import build_tiny_model

        build_tiny_model(model, seed=0)
    if not (data / "train.parquet").is_file():
        from ume_r1.synthetic.shapes import make_synthetic

        make_synthetic(str(data), seed=0)
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for r in range(rounds):
        for name, overrides in LAYOUTS.items():
            out = Path(tempfile.mkdtemp(prefix="layout_", dir=work))
            cmd = ["bash", "recipes/ume_r1_grpo.sh", "profile=tiny", f"model.path={model}"]
            cmd += [f"data.train_files={data / 'train.parquet'}", f"trainer.default_local_dir={out}"]
            cmd += [f"trainer.total_training_steps={steps}", "trainer.logger=[console]", *overrides, *extra]
            rc, wall, sampler = run_sampled(cmd, {**os.environ, "WANDB_MODE": "offline"})
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # no warm-up
            runs[name].append({"rc": rc, "wall": wall, "pss": sampler.peak_pss / 2**30, "rows": rows})
            print(
                f"round {r} {name}: rc {rc}, wall {wall:.0f} s, "
                f"median step {median(rows, 'timing_s/step'):.2f} s"
            )
    print(
        f"\n== GRPO tiny profile, {steps} steps ({steps - 1} timed), {rounds} rounds alternating "
        f"({load_line()})"
    )
    header = "layout               step_s  " + "  ".join(f"{s:>8}" for s in STAGES)
    print(header + "  sync_MB  sync_s  rollout_tok/s  peak_PSS_GB")
    for name, reps in runs.items():
        rows = [row for rep in reps for row in rep["rows"]]
        step = median(rows, "timing_s/step")
        split = "  ".join(f"{100 * median(rows, f'timing_s/{s}') / step:7.1f}%" for s in STAGES)
        print(
            f"{name:<20} {step:6.2f}  {split}  {median(rows, 'sync/bytes') / 1e6:7.2f}  "
            f"{median(rows, 'sync/seconds'):6.3f}  {median(rows, 'rollout/tokens_per_s'):13.0f}  "
            f"{statistics.median(rep['pss'] for rep in reps):11.2f}"
        )


def sizes(workers: int) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    print(f"\n== weight sync per step at Qwen2-VL shapes (vision tower frozen; {workers} standalone workers)")
    for name, kwargs in SHAPES.items():
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs))
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        state = sum(t.numel() for t in model.state_dict().values())  # tied embeddings count twice here
        trainable = sum(p.numel() for k, p in params.items() if not k.startswith("model.visual."))
        old = state * 4 * (2 + workers)  # rank 0 -> driver, driver -> object store, store -> each worker
        new = trainable * 2 * (1 + workers)  # learner -> object store once, then into each worker
        print(f"  {name}: {total / 1e9:.2f} B parameters, {trainable / 1e9:.2f} B trainable")
        print(
            f"    old: full fp32 state dict via the driver, {state * 4 / GB:.1f} GB a copy, "
            f"{old / GB:.1f} GB a step"
        )
        print(f"    new: bf16 trainable buckets, {trainable * 2 / GB:.1f} GB into each engine")
        print("         hybrid: in process, nothing crosses processes or the network")
        print(
            f"         standalone: one object-store copy per node, {new / GB:.1f} GB a step "
            f"({old / new:.1f}x less)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", default=["throughput", "layouts", "sizes"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per layout run (the first is warm-up)")
    ap.add_argument("--workers", type=int, default=8, help="standalone rollout workers for `sizes`")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for `layouts`")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    if "sizes" in args.parts:
        sizes(args.workers)
    if "throughput" in args.parts:
        throughput(args.rounds, work)
    if "layouts" in args.parts:
        layouts(args.rounds, args.steps, work, args.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
