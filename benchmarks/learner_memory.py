"""Peak memory of one learner update step on CPU at the real vocabulary: a Qwen2-VL-2B-shaped language
model (hidden 1536, vocabulary 151,936, tied embeddings) cut to two layers, fp32, text-only prompts.

Each configuration runs in a fresh process (peak RSS is per process), alternately:
- `before`: the log-prob formula the learner used until issue 8 (full fp32 logits, log-softmax over
  the vocabulary, gather), no gradient checkpointing;
- `after`: `ume_r1.policy.token_log_probs` (1024-token chunks, each checkpointed) and gradient
  checkpointing of the decoder layers.
One step = forward of the learner's policy (hidden states, response log-probs, embeddings), a
token-mean loss, backward.

    PATH=.venv/bin:$PATH python benchmarks/learner_memory.py [--lengths 256 512 1024 2048] [--responses 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_vl_shapes import QWEN2_VL  # noqa: E402

PROMPT_TOKENS = 64


def one_step(variant: str, length: int, responses: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    import ume_r1.policy as policy_module
    from ume_r1.model import enable_gradient_checkpointing

    torch.manual_seed(0)
    shape = QWEN2_VL["2B"]
    config = Qwen2VLConfig(
        text_config={
            **shape["text_config"],
            "num_hidden_layers": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 1536, "num_heads": 2, "mlp_ratio": 2},
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    if variant == "before":

        def plain(hidden, weight, targets, temperature=1.0, chunk_tokens=0, with_entropy=False):
            log_probs = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
            return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy

        policy_module.token_log_probs = plain
    else:
        enable_gradient_checkpointing(model, True, torch.device("cpu"))
    policy = policy_module.EmbeddingPolicy(model, gen_emb_id=5).train()
    vocab = shape["text_config"]["vocab_size"]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048])
    ap.add_argument("--responses", type=int, default=1, help="responses per micro-batch")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, length, responses = args.child
        print(json.dumps(one_step(variant, int(length), int(responses))))
        return 0
    results = {}
    for length in args.lengths:
        for variant in ("before", "after"):
            cmd = [sys.executable, __file__, "--child", variant, str(length), str(args.responses)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[(variant, length)] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant:>6} {length:>5}: {results[(variant, length)]}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n== one update step, {args.responses} response(s) x length + {PROMPT_TOKENS} prompt tokens, "
        "fp32 CPU"
    )
    print(f"   2-layer Qwen2-VL-2B shape, vocabulary 151,936 (load average {load})")
    print("length | peak RSS before | after | step's own growth before | after | ratio | s before | s after")
    for length in args.lengths:
        b, a = results[("before", length)], results[("after", length)]
        print(
            f"{length:>6} | {b['peak_gb']:14.2f} | {a['peak_gb']:5.2f} | {b['step_gb']:24.2f} | "
            f"{a['step_gb']:5.2f} | {b['step_gb'] / max(a['step_gb'], 1e-9):5.1f}x | {b['seconds']:8.1f} | "
            f"{a['seconds']:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
