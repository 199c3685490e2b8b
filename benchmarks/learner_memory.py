"""Peak memory of one learner update step on CPU at the real vocabulary: a Qwen2-VL-2B-shaped language
model (hidden 1536, vocabulary 151,936, tied embeddings) cut to two layers, fp32, text-only prompts.

Each configuration runs in a fresh process (peak RSS is per process), alternately:
- `before`: the log-prob formula the learner used until issue 8 (full fp32 logits, log-softmax over
  the vocabulary, gather), no gradient checkpointing;
- `after`: `ume_r1.model.policy.token_log_probs` (1024-token chunks, each checkpointed) and gradient
  checkpointing of the decoder layers;
- `trl`: TRL 1.16's training forward and loss on the same batch (its own code, from `benchmarks/.trl-env`,
  see trl_side_by_side.py): its fused LM head (log-probs and entropy in vocabulary tiles) at the response
  positions only, with gradient checkpointing (TRL's default).
One step = forward of the learner's policy (hidden states, response log-probs, embeddings; TRL: log-probs
and entropy), a token-mean loss, backward. The table gives the step's own growth per response token.

Second table (`batching`): one update over a step's worth of ragged responses, padded micro-batches
(the learner before issue 8) against token-budget micro-batches trimmed to their own longest row.

    PATH=.venv/bin:$PATH python benchmarks/learner_memory.py [lengths] [batching] [--lengths 256 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_vl_shapes import cut_2b  # noqa: E402
from trl_side_by_side import TRL_ENV, ensure_trl  # noqa: E402

PROMPT_TOKENS = 64


def one_step(variant: str, length: int, responses: int) -> dict:
    import torch
    import torch.nn.functional as F

    import ume_r1.model.policy as policy_module
    from ume_r1.model.device import enable_gradient_checkpointing

    model, vocab = cut_2b(layers=2)
    if variant == "trl":
        return trl_step(model, vocab, length, responses)
    if variant == "before":

        def plain(hidden, weight, targets, temperature=1.0, chunk_tokens=0, with_entropy=False):
            log_probs = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
            return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy

        policy_module.token_log_probs = plain
    else:
        enable_gradient_checkpointing(model, True, torch.device("cpu"))
    policy = policy_module.EmbeddingPolicy(model, gen_emb_id=5).train()
    prompt = torch.randint(0, vocab, (responses, PROMPT_TOKENS))
    response = torch.randint(0, vocab, (responses, length))
    input_ids = torch.cat([prompt, response], dim=1)
    mask = torch.ones_like(input_ids)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = policy(input_ids, mask, response, torch.ones_like(response), with_entropy=False)
    loss = -out["log_probs"].mean() + out["embeddings"].sum() * 0.0
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gb": peak / 2**20, "step_gb": (peak - baseline) / 2**20, "seconds": seconds}


def trl_step(model, vocab: int, length: int, responses: int) -> dict:
    """TRL 1.16's GRPO training forward and loss on the batch `one_step` builds: its fused LM head
    (`add_fused_lm_head`, log-probs and entropy in vocabulary tiles, never the full logits), scoring the
    response positions only as it does on a GPU (on a CPU it would score every position; see
    trl_side_by_side.py), gradient checkpointing (TRL's default), the token-mean loss, on-policy (ratio 1)."""
    import torch
    import trl.trainer.utils as trl_utils

    trl_utils._use_triton = lambda device: True  # only the choice of positions; the kernels stay torch's
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    prompt = torch.randint(0, vocab, (responses, PROMPT_TOKENS))
    response = torch.randint(0, vocab, (responses, length))
    input_ids = torch.cat([prompt, response], dim=1)
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = -100
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    mask = torch.ones_like(input_ids)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    log_probs = out.log_probs[:, -length:]
    loss = -(log_probs * torch.exp(log_probs - log_probs.detach())).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gb": peak / 2**20, "step_gb": (peak - baseline) / 2**20, "seconds": seconds}


# A micro-batch round's response lengths with a long tail, as reasoning responses have (8 rows, mean
# 208 tokens); small enough that the padded variant runs in minutes on two cores.
BATCH_LENGTHS = [1024, 256, 128, 96, 64, 48, 32, 16]


def one_batch(variant: str, budget: int, rows_per_micro: int) -> dict:
    """One update over a whole batch of ragged responses, in micro-batches: `padded` = every row padded
    to the longest response and cut into slices of `rows_per_micro` (the learner before issue 8);
    `dynamic` = rows sorted by length, micro-batches filled to `budget` tokens, each trimmed to its own
    longest row (`actor.use_dynamic_bsz`). Both with chunked log-probs and gradient checkpointing."""
    import torch

    from ume_r1.data.collate import pack_sequences
    from ume_r1.data.processor import EncodedPrompt
    from ume_r1.model.device import enable_gradient_checkpointing
    from ume_r1.model.policy import EmbeddingPolicy
    from ume_r1.training.micro_batches import plan_micro_batches

    model, vocab = cut_2b(layers=2)
    enable_gradient_checkpointing(model, True, torch.device("cpu"))
    policy = EmbeddingPolicy(model, gen_emb_id=5).train()
    torch.manual_seed(0)
    prompts = [
        EncodedPrompt(input_ids=torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()) for _ in BATCH_LENGTHS
    ]
    responses = [torch.randint(0, vocab, (n,)).tolist() for n in BATCH_LENGTHS]
    batch = pack_sequences(prompts, responses, pad_id=0)
    tokens = float(batch["response_mask"].sum())
    lengths = [PROMPT_TOKENS] * len(BATCH_LENGTHS), list(BATCH_LENGTHS)
    if variant == "padded":
        groups = plan_micro_batches(*lengths, rows_per_micro=rows_per_micro)
    else:
        groups = plan_micro_batches(*lengths, max_tokens=budget)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, computed = time.perf_counter(), 0
    for rows in groups:
        micro = {k: v[rows] for k, v in batch.items()}
        if variant == "dynamic":  # packed to these rows' own longest, as the learner does
            micro = pack_sequences([prompts[i] for i in rows], [responses[i] for i in rows], pad_id=0)
        computed += micro["input_ids"].numel()
        out = policy(**micro, with_entropy=False)
        loss = -(out["log_probs"] * micro["response_mask"]).sum() / tokens + out["embeddings"].sum() * 0.0
        loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_gb": peak / 2**20,
        "step_gb": (peak - baseline) / 2**20,
        "seconds": seconds,
        "micro_batches": len(groups),
        "computed_tokens": computed,
    }


def child(args: list[str]) -> dict:
    """Run one configuration in a fresh process (peak RSS is per process) and return its figures. TRL's
    configuration gets TRL on its path."""
    env = dict(os.environ)
    if "trl" in args:
        ensure_trl()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRL_ENV), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def lengths_table(lengths: list[int], responses: int) -> None:
    variants = ("before", "after", "trl")
    results = {}
    for length in lengths:
        for variant in variants:
            results[(variant, length)] = child(["step", variant, str(length), str(responses)])
            print(f"{variant:>6} {length:>5}: {results[(variant, length)]}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n== one update step, {responses} response(s) x length + {PROMPT_TOKENS} prompt tokens, fp32 CPU")
    print(f"   2-layer Qwen2-VL-2B shape, vocabulary 151,936 (load average {load})")
    print(
        "length | step's own growth GB: before | after | trl | MB per response token: after | trl | "
        "trl / after | s: before | after | trl"
    )
    for length in lengths:
        b, a, t = (results[(v, length)] for v in variants)
        mb_after, mb_trl = (r["step_gb"] * 1024 / (responses * length) for r in (a, t))
        print(
            f"{length:>6} | {b['step_gb']:28.2f} | {a['step_gb']:5.2f} | {t['step_gb']:4.2f} | "
            f"{mb_after:28.2f} | {mb_trl:4.2f} | {t['step_gb'] / max(a['step_gb'], 1e-9):10.1f}x | "
            f"{b['seconds']:9.1f} | {a['seconds']:5.1f} | {t['seconds']:4.1f}"
        )


def batching_table(budget: int, rows_per_micro: int, rounds: int) -> None:
    runs: dict[str, list[dict]] = {"padded": [], "dynamic": []}
    for _ in range(rounds):
        for variant in runs:
            runs[variant].append(child(["batch", variant, str(budget), str(rows_per_micro)]))
            print(f"{variant:>7}: {runs[variant][-1]}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n== one update over {len(BATCH_LENGTHS)} responses of {min(BATCH_LENGTHS)}-{max(BATCH_LENGTHS)} "
        f"tokens (mean {sum(BATCH_LENGTHS) / len(BATCH_LENGTHS):.0f}) + {PROMPT_TOKENS} prompt tokens, "
        f"fp32 CPU, load average {load}"
    )
    print("variant | micro-batches | tokens computed | peak RSS GB | s (median)")
    for variant, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        print(
            f"{variant:>7} | {rs[0]['micro_batches']:>13} | {rs[0]['computed_tokens']:>15} | "
            f"{max(r['peak_gb'] for r in rs):>11.2f} | {seconds:.1f}"
        )
    ratio = statistics.median(r["seconds"] for r in runs["padded"]) / statistics.median(
        r["seconds"] for r in runs["dynamic"]
    )
    print(f"padded / dynamic time: {ratio:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="*", help="lengths and/or batching (default: both)")
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048])
    ap.add_argument("--responses", type=int, default=1, help="responses per micro-batch (lengths table)")
    ap.add_argument("--budget", type=int, default=2176, help="token budget per micro-batch (batching)")
    ap.add_argument("--rows-per-micro", type=int, default=4, help="rows per padded micro-batch (batching)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (batching)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, variant, a, b = args.child
        run = one_step(variant, int(a), int(b)) if kind == "step" else one_batch(variant, int(a), int(b))
        print(json.dumps(run))
        return 0
    tables = args.tables or ["lengths", "batching"]
    unknown = set(tables) - {"lengths", "batching"}
    if unknown:
        ap.error(f"unknown table(s) {sorted(unknown)}; choose lengths, batching")
    if "lengths" in tables:
        lengths_table(args.lengths, args.responses)
    if "batching" in tables:
        batching_table(args.budget, args.rows_per_micro, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
