"""This project's GRPO step against TRL's `GRPOTrainer`, side by side on this machine, at two shapes.

- `--shape tiny`: the random tiny Qwen2-VL, text-only pairs, G=4, 4 pairs per step (8 prompts: each
  pair's query and target, as UME-R1 samples both), at most 48 new tokens, lr 1e-4. With a random model
  both loops generate (nearly) the full length.
- `--shape 2b`: the Qwen2-VL-2B shape (`ume_r1.model.qwen2_vl`: the real tokenizer, the tied 151,936-row
  table, 1536 hidden, the real vision width; `--layers` decoder layers and as many vision blocks, near
  the published 28 : 32, unless `--vision-layers`), one 336 x 336
  image per query (576 patches before merging, 144 tokens after), text targets, G=8, 4 pairs per step,
  at most 256 new tokens, lr 1e-6. Ragged lengths: the `<gen_emb>` row of the random model is set along
  the mean direction of its last-layer states, scaled so that a random response stops after about
  `--mean-length` tokens (a per-token stop probability of 1 / mean-length over the states of random
  responses; `calibrate_stop`). Both systems sample that one model at temperature 1 with the same stop
  ids and suppressed ids, so they draw from the same length distribution; the table prints the mean
  lengths they drew.

Common to both: fp32, KL to the reference with coefficient 0.04 (k3), token-mean loss over the step,
one optimizer step per step, the vision tower frozen, no gradient checkpointing, the same UME reward
(ranking x gap + format) on `<gen_emb>` embeddings. TRL has no embedding forward, so its reward function
runs one: EmbeddingPolicy's embeddings-only forward (no vocabulary projection; each image's vision
features once for its G rows), the cheapest way to get them with the model TRL trains. TRL runs in its
vision-language mode at the 2B shape (conversational prompts, the image in its own column, Qwen2-VL's
processor with the chat template that renders exactly this project's prompt, which the script checks)
and on transformers' generate (its vLLM modes were not tried on vLLM's CPU build). TRL 1.16 cannot run
UME-R1's batches as shipped (image queries and text targets in one step): two shims in its process,
`FlatImages` and `no_empty_images`, give its processor and model the inputs they accept, and nothing
else. Its fused LM head scores only the response positions, as it does on a GPU (on a CPU it would
score the prompts' too). At the 2B shape both accumulate over micro-batches of 8 rows.

TRL is installed by this script into its own directory (`benchmarks/.trl-env`, `pip --target`, no
dependencies: it runs on this project's torch, transformers, accelerate and datasets), which only the
TRL subprocess puts on its path. Rounds alternate the layouts; figures are medians of the per-step
times after `--warmup` steps, over all rounds; peak memory is the largest sum of PSS over the whole
process tree of a run (Ray's processes included), sampled every 3 s, so a peak shorter than that can be
missed. Exact figures beside it: TRL's one process reports its peak resident size, and this project's
learner process its peak in each stage (`perf/peak_memory_gb/*`).

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/trl_side_by_side.py [--rounds 3] [--steps 8]
    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/trl_side_by_side.py --shape 2b --rounds 1 --steps 3 \
        --warmup 1 --layouts hybrid hybrid-vllm standalone-vllm trl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
TRL_ENV = REPO / "benchmarks" / ".trl-env"
TRL_VERSION = "1.16.0"
KL_COEF, SEED = 0.04, 1
WORDS = ("red", "green", "blue", "yellow", "purple", "orange")
THINGS = ("circle", "square", "triangle", "star", "hexagon", "arrow")
IMAGE_SIDE = 336


@dataclass(frozen=True)
class Shape:
    pairs: int
    g: int
    new_tokens: int
    lr: float
    overrides: tuple[str, ...]  # this project's, beyond the common ones
    trl_micro_rows: int | None  # rows per TRL micro-batch (None: the whole step in one)


SHAPES = {
    "tiny": Shape(4, 4, 48, 1e-4, (), None),
    "2b": Shape(
        4,
        8,
        256,
        1e-6,
        (
            "data.max_prompt_length=1024",
            f"data.max_pixels={IMAGE_SIDE * IMAGE_SIDE}",
            "rollout.micro_batch_size=8",
            # rows per forward / backward, as TRL's micro-batches (not the default token budget, whose
            # 16,384 tokens take 56 of these rows at once and most of the update's memory)
            "actor.use_dynamic_bsz=false",
            "actor.micro_batch_size_per_gpu=8",
            "rollout.cpu_kvcache_space_gb=4",
            "trainer.reasoning_sensitivity_freq=0",
        ),
        8,
    ),
}
LAYOUTS = {
    "standalone": ["trainer.hybrid_engine=false", "rollout.num_workers=2"],
    "standalone-vllm": ["trainer.hybrid_engine=false", "rollout.num_workers=1", "rollout.name=vllm"],
    "hybrid": ["trainer.hybrid_engine=true"],
    "hybrid-vllm": ["trainer.hybrid_engine=true", "rollout.name=vllm"],
    "hybrid-2": ["trainer.hybrid_engine=true", "learner.num_workers=2"],
    # micro-batches by the default token budget (ume_r1.training.micro_batches) instead of rows
    "hybrid-token-budget": ["trainer.hybrid_engine=true", "actor.use_dynamic_bsz=true"],
}


def side(text: str, image: bytes | None = None) -> dict:
    from ume_r1.synthetic.shapes import side_struct

    return side_struct(text, image)


def write_pairs(rows: list[dict], path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ume_r1.data.rl_rows import RL_SCHEMA

    pq.write_table(pa.Table.from_pylist(rows, schema=RL_SCHEMA), path)
    return str(path)


def make_tiny_inputs(root: Path) -> tuple[str, str]:
    """The random tiny model and a parquet of text-only pairs (native layout)."""
    from ume_r1.model.tiny import build_tiny_model

    model = build_tiny_model(root / "model", seed=0)
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
    return model, write_pairs(rows, root / "pairs.parquet")


def make_2b_inputs(root: Path, layers: int, vision_layers: int, mean_length: int) -> tuple[str, str]:
    """The 2B-shaped model with UME tokens and a calibrated stop row, and image -> text pairs."""
    import numpy as np

    from ume_r1.data.processor import UMEProcessor, load_image_processor
    from ume_r1.data.rl_rows import load_examples
    from ume_r1.model.hf_checkpoint import load_model, save_checkpoint_dir
    from ume_r1.model.qwen2_vl import build_qwen2_vl
    from ume_r1.synthetic.shapes import render

    rng = np.random.default_rng(0)
    rows = [
        {
            "query": side("Find the caption of this picture.", render(c, t, rng, size=IMAGE_SIDE)),
            "positive": side(f"A {c} {t} drawn on a plain background."),
            "negatives": [],
            "task": "retrieval",
        }
        for c in WORDS
        for t in THINGS
    ]
    data = write_pairs(rows, root / "pairs.parquet")
    stock = build_qwen2_vl(root / "stock", layers=layers, vision_depth=vision_layers)
    model, tokenizer = load_model(stock)  # fp32; the UME tokens take spare rows of the table
    processor = UMEProcessor(tokenizer, load_image_processor(stock, IMAGE_SIDE * IMAGE_SIDE))
    examples, _ = load_examples(data)
    prompts = [processor.encode(s) for e in examples[:4] for s in (e.query, e.positive)]
    calibrate_stop(model, processor, prompts, mean_length)
    out = save_checkpoint_dir(root / "model", model, tokenizer, load_image_processor(stock))
    return out, data


def calibrate_stop(model, processor, prompts, mean_length: int, probe_tokens: int = 64) -> float:
    """Set the `<gen_emb>` row (the table is tied: its input row too) to c * u, u the unit mean of the
    last-layer states at random responses' positions, with c solved so that the stop probability
    averaged over those states is 1 / `mean_length`. Returns that average."""
    import torch
    import torch.nn.functional as F

    from ume_r1.data.collate import media_inputs, mm_token_type_ids, pack_sequences

    gen_emb = processor.gen_emb_id
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, 151_000, (probe_tokens,), generator=generator).tolist() for _ in prompts]
    batch = pack_sequences(prompts, responses, processor.pad_id)
    with torch.no_grad():
        ids = batch["input_ids"]
        out = model.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=mm_token_type_ids(
                ids, model.config.image_token_id, model.config.video_token_id
            ),
            **media_inputs(prompts),
        )
        states = out.last_hidden_state[:, -probe_tokens:].reshape(-1, out.last_hidden_state.shape[-1])
        weight = model.lm_head.weight
        others = torch.cat([F.linear(chunk, weight) for chunk in states.split(128)])
        others[:, gen_emb] = float("-inf")
        log_z = torch.logsumexp(others, dim=-1)
        unit = F.normalize(states.mean(0), dim=0)
        score = states @ unit
        low, high = 0.0, 10.0
        for _ in range(50):  # bisection on c: mean sigmoid(c * score - log_z) = 1 / mean_length
            c = (low + high) / 2
            rate = float(torch.sigmoid(c * score - log_z).mean())
            low, high = (c, high) if rate < 1 / mean_length else (low, c)
        weight[gen_emb] = c * unit
    return rate


def ensure_trl() -> None:
    if not (TRL_ENV / "trl").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_ENV)]
            + [f"trl=={TRL_VERSION}"],
            check=True,
        )


PACKAGES = ("ume_r1", "workers", "rewards", "sft", "configs")


@contextlib.contextmanager
def checked_out(rev: str | None):
    """This tree's packages and configs as of `rev` (None: as they are) while inside. In place, not in a
    worktree: the venv's editable install (and its .pth hook) maps `ume_r1` and `workers` to this tree,
    in the trainer and in every Ray worker it starts. Refuses uncommitted changes there."""
    if rev is None:
        yield
        return
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *PACKAGES], cwd=REPO, capture_output=True, text=True
    )
    if dirty.stdout.strip():
        raise SystemExit(f"--before needs {', '.join(PACKAGES)} committed; uncommitted:\n{dirty.stdout}")
    subprocess.run(["git", "checkout", rev, "--", *PACKAGES], cwd=REPO, check=True)
    try:
        yield
    finally:
        subprocess.run(["git", "checkout", "HEAD", "--", *PACKAGES], cwd=REPO, check=True)
        subprocess.run(["git", "clean", "-fdq", "--", *PACKAGES], cwd=REPO, check=True)  # files only REV has


def trainer_module() -> str:
    """The GRPO entry point of the checked-out tree: ume_r1.grpo.trainer, or ume_r1.trainer before the
    package moved into subpackages (a --before revision)."""
    return "ume_r1.grpo.trainer" if (REPO / "ume_r1" / "grpo" / "trainer.py").is_file() else "ume_r1.trainer"


def peak_pss(process: subprocess.Popen, every_s: float = 3.0) -> int:
    """Wait for `process`; the largest sum of PSS over it and its descendants, sampled every `every_s`
    (reading a large process's page map costs this process a few percent of a core at this rate).
    Prints the largest processes at that peak."""
    peak, at_peak, root = 0, [], psutil.Process(process.pid)
    while process.poll() is None:
        members = []
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                members.append((member.memory_full_info().pss, member.name()))
        total = sum(pss for pss, _ in members)
        if total > peak:
            peak, at_peak = total, sorted(members, reverse=True)[:4]
        time.sleep(every_s)
    largest = ", ".join(f"{name} {pss / 1e9:.2f}" for pss, name in at_peak)
    print(f"  peak PSS {peak / 1e9:.2f} GB, largest processes (GB): {largest}", flush=True)
    return peak


def run_measured(command: list[str], cwd: Path, env: dict) -> int:
    """Run `command` to its end (an error if it fails); its process tree's peak PSS in bytes."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    result: dict[str, int] = {}
    watcher = threading.Thread(target=lambda: result.update(peak=peak_pss(process)))
    watcher.start()
    process.wait()
    watcher.join()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return result["peak"]


def run_ours(model: str, data: str, steps: int, layout: str, shape: Shape, out: Path) -> dict:
    """One run of the GRPO trainer of the checked-out tree; per-step seconds, response lengths, stage
    times and generated tokens from its metrics, and the peak PSS."""
    overrides = [
        "profile=tiny",
        f"model.path={model}",
        f"data.train_files={data}",
        f"data.train_batch_size={shape.pairs}",
        f"rollout.n={shape.g}",
        f"rollout.response_length={shape.new_tokens}",
        f"actor.optim.lr={shape.lr}",
        f"actor.kl_loss_coef={KL_COEF}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={out}",
        f"trainer.seed={SEED}",
        "trainer.logger=[console]",
        *shape.overrides,
        *LAYOUTS[layout],
    ]
    peak = run_measured(
        [sys.executable, "-m", trainer_module(), *overrides],
        REPO,
        {**os.environ, "WANDB_MODE": "disabled"},
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = ("generate", "rollout", "forward", "reward", "update", "sync")
    return {
        "step_s": [r["timing_s/step"] for r in rows],
        "length": [r["response/length_mean"] for r in rows],
        "generate_s": [r["timing_s/generate"] for r in rows],
        "stages": {s: [r.get(f"timing_s/{s}", 0.0) for r in rows] for s in stages},
        "peak": peak,
        "learner_peaks": {  # the learner process's own high-water mark in each stage, over the steps
            k.removeprefix("perf/peak_memory_gb/"): max(r[k] for r in rows if k in r)
            for k in sorted({k for r in rows for k in r if k.startswith("perf/peak_memory_gb/")})
        },
    }


TRL_SCRIPT = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import Qwen2VLModel, Qwen2VLProcessor, Qwen2VLVideoProcessor, TrainerCallback
import trl.trainer.utils as trl_utils
from trl import GRPOConfig, GRPOTrainer

from ume_r1.data.collate import pack_sequences, shared_media
from ume_r1.data.processor import UMEProcessor, load_image_processor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.template import chat_prompt, user_text
from ume_r1.grpo.grouping import encode_example, plan_prompts
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.reward.batch import RewardBatch
from ume_r1.reward.registry import load_reward
from ume_r1.rollout.engine import special_ids

model_dir, data, steps, pairs, g, new_tokens, lr, kl, seed, micro, max_pixels, out = sys.argv[1:]
steps, pairs, g, new_tokens, seed, micro = map(int, (steps, pairs, g, new_tokens, seed, micro))
torch.manual_seed(seed)
processor = UMEProcessor.from_pretrained(model_dir, 1024, int(max_pixels))
tok = processor.tokenizer
examples, _ = load_examples(data)
images = any(side.images for e in examples for side in (e.query, e.positive))
# Qwen2-VL's chat template, which renders exactly this project's prompt (checked below)
TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
plans, rows = [], []
for step in range(steps):  # the same prompts per step as the project plans them (query and target)
    batch = [examples[(step * pairs + i) % len(examples)] for i in range(pairs)]
    plan = plan_prompts([encode_example(e, processor)[0] for e in batch])
    plans.append(plan)
    texts = {}  # each prompt's input text, for the conversational prompt TRL renders itself
    for e, q, t in zip(batch, plan.query_of_example, plan.positive_of_example):
        texts[q], texts[t] = e.query.text, e.positive.text
    for i, p in enumerate(plan.prompts):
        if images:
            # an "images" list per prompt, [] for a text prompt (see FlatImages)
            prompt = [{"role": "user", "content": user_text(texts[i])}]
            rows.append({"prompt": prompt, "step": step, "slot": i, "images": list(p.images or [])})
        else:
            rows.append({"prompt": tok.decode(p.input_ids), "step": step, "slot": i})
prompts_per_step = len(plans[0].prompts)
model, _ = load_model(model_dir)
model.model.visual.requires_grad_(False)  # frozen, as this project's learner.freeze_vision_tower
vocab = model.config.get_text_config().vocab_size
stop, suppressed = special_ids(tok, model.generation_config.eos_token_id, vocab)
model.generation_config.eos_token_id = stop  # TRL stops (and masks) at these, as this project does
reward = load_reward("ume")
policy = EmbeddingPolicy(model, processor.gen_emb_id)

def ume_reward(prompts, completions, completion_ids, step, slot, **_):
    plan = plans[step[0]]
    encoded = [plan.prompts[s] for s in slot]
    batch = pack_sequences(encoded, completion_ids, processor.pad_id)
    with torch.no_grad():
        out = policy(**batch, shared=shared_media(encoded), with_log_probs=False)
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

rows_per_step = prompts_per_step * g
micro = micro or rows_per_step
clock = Clock()
config = GRPOConfig(
    output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=rows_per_step // micro,
    num_generations=g, max_completion_length=new_tokens, learning_rate=float(lr), beta=float(kl),
    temperature=1.0, loss_type="dapo", epsilon=0.2, max_steps=steps, logging_steps=1, report_to="none",
    use_cpu=True, save_strategy="no", shuffle_dataset=False, seed=seed, disable_tqdm=True,
    lr_scheduler_type="constant", generation_kwargs={"suppress_tokens": suppressed},
    # TRL's defaults differ here: fp32 and no gradient checkpointing, as this project on CPU
    bf16=False, gradient_checkpointing=False,
)


class FlatImages(Qwen2VLProcessor):
    # TRL 1.16 re-processes a step's prompts for its forwards with one image list per prompt, None for
    # a text prompt, which transformers' processor refuses (fetch_images). A Qwen2-VL processor takes a
    # batch's images as one list in prompt order, which is what this gives it; nothing else changes.
    # UME-R1's layout (image queries, text targets) mixes the two in every step.

    def __call__(self, images=None, text=None, **kwargs):
        if isinstance(images, list):
            images = [im for row in images if row for im in (row if isinstance(row, list) else [row])] or None
        return super().__call__(images=images, text=text, **kwargs)


def no_empty_images(forward):
    # TRL 1.16 then scores micro-batches with their slice of the pixels, an empty one for a micro-batch of
    # text prompts, on which Qwen2-VL's vision tower fails (torch.cat of nothing): none is what it means.
    # On the class: TRL builds its reference model itself.
    def call(self, *args, pixel_values=None, image_grid_thw=None, **kwargs):
        if pixel_values is not None and pixel_values.numel() == 0:
            pixel_values = image_grid_thw = None
        return forward(self, *args, pixel_values=pixel_values, image_grid_thw=image_grid_thw, **kwargs)
    return call


# TRL's fused head scores only the response positions on a Triton device; elsewhere every position, the
# prompt's too, which on this CPU would cost it the full-vocabulary logits of every prompt token. It gets
# its GPU behaviour here (only that choice: its kernels stay the torch ones).
trl_utils._use_triton = lambda device: True
processing = tok
if images:
    Qwen2VLModel.forward = no_empty_images(Qwen2VLModel.forward)
    image_processor = load_image_processor(model_dir, int(max_pixels))
    processing = FlatImages(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=TEMPLATE,
    )
    content = [{"type": "image"}, {"type": "text", "text": user_text(examples[0].query.text)}]
    rendered = processing.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == chat_prompt(examples[0].query.text, num_images=1), rendered
trainer = GRPOTrainer(model=model, reward_funcs=ume_reward, args=config, processing_class=processing,
                      train_dataset=Dataset.from_list(rows), callbacks=[clock])
trainer.train()
history = trainer.state.log_history
lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # exact, not sampled
json.dump({"step_s": clock.times, "length": lengths, "peak_rss_gb": peak_gb}, open(out + "/trl.json", "w"))
"""


def run_trl(model: str, data: str, steps: int, shape: Shape, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = [model, data, steps, shape.pairs, shape.g, shape.new_tokens, shape.lr, KL_COEF, SEED]
    args += [shape.trl_micro_rows or 0, IMAGE_SIDE * IMAGE_SIDE, out]
    env = {**os.environ, "PYTHONPATH": f"{TRL_ENV}{os.pathsep}{REPO}", "WANDB_MODE": "disabled"}
    peak = run_measured([sys.executable, "-c", TRL_SCRIPT, *map(str, args)], REPO, env)
    return {**json.loads((out / "trl.json").read_text()), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--layouts", nargs="+", default=["hybrid", "hybrid-2", "standalone", "trl"])
    parser.add_argument("--layers", type=int, default=2, help="2b: decoder layers")
    parser.add_argument(
        "--vision-layers",
        type=int,
        help="2b: vision blocks (default: as many as decoder layers, near the published 32 : 28)",
    )
    parser.add_argument("--mean-length", type=int, default=100, help="2b: mean response length drawn")
    parser.add_argument("--new-tokens", type=int, help="cap on new tokens (default: the shape's)")
    parser.add_argument(
        "--before", metavar="REV", help="also run each of this project's layouts from this git revision"
    )
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.new_tokens:
        shape = replace(shape, new_tokens=args.new_tokens)
    ensure_trl()
    if args.before:
        args.layouts += [f"{name}@{args.before}" for name in args.layouts if name != "trl"]
    keys = ("step_s", "length", "generate_s", "peak", "peak_rss_gb")
    results: dict[str, dict[str, list]] = {name: {k: [] for k in keys} for name in args.layouts}
    stages: dict[str, dict[str, list]] = {}
    learner_peaks: dict[str, dict[str, list]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "tiny":
            model, data = make_tiny_inputs(Path(tmp))
        else:
            vision = args.vision_layers or args.layers
            model, data = make_2b_inputs(Path(tmp), args.layers, vision, args.mean_length)
        for r in range(args.rounds):
            for name in args.layouts:
                out = Path(tmp) / f"{name}-{r}"
                start = time.perf_counter()
                if name == "trl":
                    got = run_trl(model, data, args.steps, shape, out)
                else:
                    layout, _, rev = name.partition("@")
                    with checked_out(rev or None):
                        got = run_ours(model, data, args.steps, layout, shape, out)
                for key in ("step_s", "length", "generate_s"):
                    results[name][key] += got.get(key, [])[args.warmup :]
                results[name]["peak"].append(got["peak"])
                if "peak_rss_gb" in got:
                    results[name]["peak_rss_gb"].append(got["peak_rss_gb"])
                for stage, gb in got.get("learner_peaks", {}).items():
                    learner_peaks.setdefault(name, {}).setdefault(stage, []).append(gb)
                for stage, values in got.get("stages", {}).items():
                    stages.setdefault(name, {}).setdefault(stage, []).extend(values[args.warmup :])
                loads.append(os.getloadavg()[0])
                print(f"round {r} {name}: {time.perf_counter() - start:.1f} s wall", flush=True)
                print(f"  {name}: {json.dumps(got)}", flush=True)  # the raw figures, as they come

    report(args, shape, results, stages, learner_peaks, loads)


def report(args, shape: Shape, results: dict, stages: dict, learner_peaks: dict, loads: list[float]) -> None:
    rows = shape.pairs * 2 * shape.g
    print(
        f"\n--shape {args.shape}: {shape.pairs} pairs/step ({2 * shape.pairs} prompts), G={shape.g}, "
        f"<= {shape.new_tokens} new tokens, fp32, {os.cpu_count()} CPU cores, {args.rounds} round(s) x "
        f"{args.steps - args.warmup} timed step(s)"
    )
    print(f"load average during the runs: median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    print(
        f"{'layout':<24}{'step s':>9}{'pairs/s':>9}{'gen tok/s':>11}{'resp. len':>11}{'peak GB':>9}"
        f"{'vs TRL':>8}{'mem vs TRL':>12}"
    )
    median = lambda values: statistics.median(values) if values else float("nan")  # noqa: E731
    trl = results.get("trl")
    trl_rate = shape.pairs / median(trl["step_s"]) if trl else None
    trl_peak = max(trl["peak"]) if trl else None
    for name, res in results.items():
        step = median(res["step_s"])
        length = statistics.mean(res["length"]) if res["length"] else float("nan")
        gen = rows * length / median(res["generate_s"]) if res["generate_s"] else float("nan")
        peak = max(res["peak"])
        ratio = f"{shape.pairs / step / trl_rate:.2f}x" if trl_rate else "-"
        memory = f"{peak / trl_peak:.2f}x" if trl_peak else "-"
        print(
            f"{name:<24}{step:>9.2f}{shape.pairs / step:>9.3f}{gen:>11.1f}{length:>11.1f}{peak / 1e9:>9.2f}"
            f"{ratio:>8}{memory:>12}"
        )
    for name, split in stages.items():
        total = median(results[name]["step_s"])
        parts = ", ".join(f"{s} {median(v):.2f} s ({median(v) / total:.0%})" for s, v in split.items())
        print(f"{name} stages (medians): {parts}")
    trl_rss = max(trl.get("peak_rss_gb", [])) if trl and trl.get("peak_rss_gb") else None
    if trl_rss:
        print(f"trl process, peak resident GB (its own ru_maxrss, exact): {trl_rss:.2f}")
    for name, split in learner_peaks.items():
        parts = ", ".join(f"{s} {max(v):.2f}" for s, v in split.items())
        top = max(max(v) for v in split.values())
        versus = f"; the largest, {top:.2f}, is {top / trl_rss:.2f}x TRL's process" if trl_rss else ""
        print(f"{name} learner process, peak resident GB per stage (max over rounds): {parts}{versus}")


if __name__ == "__main__":
    main()
