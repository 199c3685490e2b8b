"""This project's GRPO step against TRL's `GRPOTrainer`, side by side on this machine.

Same random tiny Qwen2-VL, same text-only pairs, G=4, 4 pairs per step (8 prompts: each pair's query
and target, as UME-R1 samples both), at most 48 new tokens, fp32, lr 1e-4, KL to the reference with
coefficient 0.04, token-mean loss, the same UME reward (ranking x gap + format) on `<gen_emb>`
embeddings. With a random model both loops generate (nearly) the full length. TRL has no embedding
forward, so its reward function runs one: EmbeddingPolicy's embeddings-only forward (no vocabulary
projection), the cheapest way to get them with the model TRL trains.

TRL is installed by this script into its own directory (`benchmarks/.trl-env`, `pip --target`, no
dependencies: it runs on this project's torch, transformers, accelerate and datasets), which only the
TRL subprocess puts on its path. Rounds alternate the layouts; figures are medians of the per-step
times after `--warmup` steps, over all rounds.

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/trl_side_by_side.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_ENV = REPO / "benchmarks" / ".trl-env"
TRL_VERSION = "1.16.0"
PAIRS, G, NEW_TOKENS, LR, KL_COEF, SEED = 4, 4, 48, 1e-4, 0.04, 1
WORDS = ("red", "green", "blue", "yellow", "purple", "orange")
THINGS = ("circle", "square", "triangle", "star", "hexagon", "arrow")


def make_inputs(root: Path) -> tuple[str, str]:
    """The random tiny model and a parquet of text-only pairs (native layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ume_r1.data.rl_rows import RL_SCHEMA
    from ume_r1.model.tiny import build_tiny_model

    model = build_tiny_model(root / "model", seed=0)
    side = lambda text: {"text": text, "images": [], "video": []}  # noqa: E731
    rows = [
        {
            "query": side(f"Find the caption of a {c} {t}."),
            "positive": side(f"A {c} {t} drawn on a plain background."),
            "negatives": [],
            "task": "retrieval",
        }
        for c in WORDS
        for t in THINGS
    ]
    path = root / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=RL_SCHEMA), path)
    return model, str(path)


def ensure_trl() -> None:
    if not (TRL_ENV / "trl").is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(TRL_ENV),
                f"trl=={TRL_VERSION}",
            ],
            check=True,
        )


def trainer_module(tree: Path) -> str:
    """The GRPO entry point of a source tree: ume_r1.grpo.trainer, or ume_r1.trainer before the package
    moved into subpackages (a --before revision)."""
    return "ume_r1.grpo.trainer" if (tree / "ume_r1" / "grpo" / "trainer.py").is_file() else "ume_r1.trainer"


def run_ours(model: str, data: str, steps: int, layout: str, out: Path, tree: Path = REPO) -> dict:
    """One run of the GRPO trainer of the source `tree`; per-step seconds, response lengths and stage
    times from its metrics."""
    layouts = {
        "standalone": ["trainer.hybrid_engine=false", "rollout.num_workers=2"],
        "hybrid": ["trainer.hybrid_engine=true"],
        "hybrid-2": ["trainer.hybrid_engine=true", "learner.num_workers=2"],
    }
    overrides = [
        "profile=tiny",
        f"model.path={model}",
        f"data.train_files={data}",
        f"data.train_batch_size={PAIRS}",
        f"rollout.n={G}",
        f"rollout.response_length={NEW_TOKENS}",
        f"actor.optim.lr={LR}",
        f"actor.kl_loss_coef={KL_COEF}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={out}",
        f"trainer.seed={SEED}",
        "trainer.logger=[console]",
        *layouts[layout],
    ]
    subprocess.run(
        [sys.executable, "-m", trainer_module(tree), *overrides],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = ("generate", "rollout", "forward", "reward", "update", "sync")
    return {
        "step_s": [r["timing_s/step"] for r in rows],
        "length": [r["response/length_mean"] for r in rows],
        "stages": {s: [r[f"timing_s/{s}"] for r in rows] for s in stages},
    }


TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from ume_r1.data.collate import pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.grpo.grouping import plan_prompts
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.reward.batch import RewardBatch
from ume_r1.reward.registry import load_reward

model_dir, data, steps, pairs, g, new_tokens, lr, kl, seed, out = sys.argv[1:]
steps, pairs, g, new_tokens, seed = int(steps), int(pairs), int(g), int(new_tokens), int(seed)
torch.manual_seed(seed)
processor = UMEProcessor.from_pretrained(model_dir)
tok = processor.tokenizer
examples, _ = load_examples(data)
plans, rows = [], []
for step in range(steps):  # the same prompts per step as the project plans them (query and target)
    batch = [examples[(step * pairs + i) % len(examples)] for i in range(pairs)]
    plan = plan_prompts(batch, processor.encode)
    plans.append(plan)
    rows += [{"prompt": tok.decode(p.input_ids), "step": step, "slot": i} for i, p in enumerate(plan.prompts)]
prompts_per_step = len(plans[0].prompts)
model, _ = load_model(model_dir)
reward = load_reward("ume")
policy = EmbeddingPolicy(model, processor.gen_emb_id)

def ume_reward(prompts, completions, completion_ids, step, slot, **_):
    plan = plans[step[0]]
    encoded = [plan.prompts[s] for s in slot]
    batch = pack_sequences(encoded, completion_ids, processor.pad_id)
    with torch.no_grad():
        out = policy(**batch, with_log_probs=False)  # the embeddings only: no vocabulary projection
    scores = reward(RewardBatch(
        embeddings=out["embeddings"], responses=tok.batch_decode(completion_ids),
        prompt_index=torch.tensor(list(slot)), has_gen_emb=out["has_gen_emb"], roles=plan.roles,
        positives=plan.positives, negatives=plan.negatives, in_batch_negatives=plan.in_batch_negatives))
    return scores["reward"].tolist()

class Clock(TrainerCallback):
    def __init__(self):
        self.times = []
    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)

clock = Clock()
config = GRPOConfig(
    output_dir=out, per_device_train_batch_size=prompts_per_step * g, num_generations=g,
    max_completion_length=new_tokens, learning_rate=float(lr), beta=float(kl), temperature=1.0,
    loss_type="dapo", epsilon=0.2, max_steps=steps, logging_steps=1, report_to="none", use_cpu=True,
    save_strategy="no", shuffle_dataset=False, seed=seed, disable_tqdm=True, lr_scheduler_type="constant",
    # TRL's defaults differ here: fp32 and no gradient checkpointing, as this project on CPU
    bf16=False, gradient_checkpointing=False,
)
trainer = GRPOTrainer(model=model, reward_funcs=ume_reward, args=config, processing_class=tok,
                      train_dataset=Dataset.from_list(rows), callbacks=[clock])
trainer.train()
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
json.dump({"step_s": clock.times, "length": lengths}, open(out + "/trl.json", "w"))
"""


def run_trl(model: str, data: str, steps: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", TRL_SCRIPT, model, data, str(steps), str(PAIRS), str(G), str(NEW_TOKENS)]
        + [str(LR), str(KL_COEF), str(SEED), str(out)],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": f"{TRL_ENV}{os.pathsep}{REPO}", "WANDB_MODE": "disabled"},
    )
    return json.loads((out / "trl.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--layouts", nargs="+", default=["hybrid", "hybrid-2", "standalone", "trl"])
    parser.add_argument(
        "--before", metavar="REV", help="also run each of this project's layouts from this git revision"
    )
    args = parser.parse_args()
    ensure_trl()
    trees = {}
    if args.before:
        tree = Path(tempfile.mkdtemp()) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=REPO, check=True)
        for name in [n for n in args.layouts if n != "trl"]:
            trees[f"{name}@{args.before}"] = tree
            args.layouts.append(f"{name}@{args.before}")
    results: dict[str, dict[str, list]] = {name: {"step_s": [], "length": []} for name in args.layouts}
    stages: dict[str, dict[str, list]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_inputs(Path(tmp))
        for r in range(args.rounds):
            for name in args.layouts:
                out = Path(tmp) / f"{name}-{r}"
                start = time.perf_counter()
                if name == "trl":
                    got = run_trl(model, data, args.steps, out)
                else:
                    got = run_ours(model, data, args.steps, name.split("@")[0], out, trees.get(name, REPO))
                results[name]["step_s"] += got["step_s"][args.warmup :]
                results[name]["length"] += got["length"][args.warmup :]
                for stage, values in got.get("stages", {}).items():
                    stages.setdefault(name, {}).setdefault(stage, []).extend(values[args.warmup :])
                loads.append(os.getloadavg()[0])
                print(f"round {r} {name}: {time.perf_counter() - start:.1f} s wall", flush=True)

    for tree in set(trees.values()):
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    print(
        f"\n{PAIRS} pairs/step ({2 * PAIRS} prompts), G={G}, <= {NEW_TOKENS} new tokens, fp32, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"load average during the runs: median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    print(f"{'layout':<20}{'step s (median)':>16}{'pairs/s':>10}{'resp. length':>14}{'vs TRL':>8}")
    trl_rate = PAIRS / statistics.median(results["trl"]["step_s"]) if "trl" in results else None
    for name, res in results.items():
        rate = PAIRS / statistics.median(res["step_s"])
        ratio = f"{rate / trl_rate:.2f}x" if trl_rate else "-"
        length = statistics.mean(res["length"]) if res["length"] else float("nan")
        print(f"{name:<20}{statistics.median(res['step_s']):>16.3f}{rate:>10.2f}{length:>14.1f}{ratio:>8}")
    for name, split in stages.items():
        total = statistics.median(results[name]["step_s"])
        parts = ", ".join(
            f"{s} {statistics.median(v):.3f} s ({statistics.median(v) / total:.0%})" for s, v in split.items()
        )
        print(f"{name} stages (medians): {parts}")


if __name__ == "__main__":
    main()
