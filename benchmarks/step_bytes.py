"""Bytes the driver serialises for the learners in one on-policy GRPO step (the default): what
`compute_forwards` (the reference's log-probs), `update_actor` (with the reference's log-probs and the
advantages; no old log-probs) and the reasoning probe send to the ranks (each rank's chunk of the step's
DataProto, pickled as Ray does), plus what is put into the object store once per step.

    python benchmarks/step_bytes.py                 # the tiny profile and a 2B-sized image step

Two steps are measured, both built with the controller's own code (ume_r1.grpo.learner_batch):
- tiny: the tiny model's processor, 8 pairs of the synthetic set (56 x 56 images), G=8, responses of
  8..32 tokens, one rank (the tiny profile);
- 2b: the 2B-shaped checkpoint's processor (real tokenizer, Qwen2-VL's preprocessor), 8 pairs whose
  query has one 1280 x 720 image (resized to 1288 x 728: 1,196 merged patches, 4,784 fp32 patch rows
  of 1,176 values, 22.5 MB), G=8, responses of 64..1,024 tokens, 2 ranks.

Before the driver shared the prompts by reference (commit a4e5a6b and earlier), every call carried the
padded sequences and each rank's prompts with their pixels: measured then, tiny 1.02 MB a call and
4.13 MB a step; 2b 199.7 MB a call and 800.3 MB a step. Until the forwards before the update became one
call on on-policy steps, a step made four learner calls: tiny 0.82 MB, 2b 178.3 MB a step.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile

import numpy as np
import torch
from PIL import Image

from ume_r1.data.processor import UMEProcessor, load_image_processor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.grpo.learner_batch import build_sequences, learner_prompts, pad_for_ranks
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.qwen2_vl import build_qwen2_vl
from ume_r1.model.tiny import build_tiny_model
from ume_r1.synthetic.shapes import make_synthetic

CALLS = ("compute_forwards", "update_actor", "probe")


def dumps(value) -> int:
    return len(pickle.dumps(value, protocol=5))


def step_bytes(prompts, responses, ranks: int) -> dict[str, int]:
    """Serialised bytes of each learner call of one step, and of what is shared once by reference."""
    data, _ = build_sequences(prompts, responses)
    shared = learner_prompts(data.meta_info.pop("prompts"))  # put into the object store once a step
    padded = pad_for_ranks(data, ranks)
    width = padded.batch["response_mask"].shape[1]
    for key in ("ref_log_prob", "advantages"):  # what update_actor carries on top
        padded.batch[key] = torch.zeros(len(padded), width)
    per_call = sum(dumps(chunk) for chunk in padded.chunk(ranks))
    padded.pop(batch_keys=["ref_log_prob", "advantages"])
    forward_call = sum(dumps(chunk) for chunk in padded.chunk(ranks))
    out = {name: forward_call for name in CALLS}
    out["update_actor"] = per_call
    out["once"] = dumps(shared)
    out["total"] = sum(out[name] for name in CALLS) + out["once"]
    return out


def groups(rng, prompts: int, g: int, low: int, high: int, vocab: int) -> list[list[list[int]]]:
    return [
        [rng.integers(10, vocab, rng.integers(low, high + 1)).tolist() for _ in range(g)]
        for _ in range(prompts)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--g", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = UMEProcessor.from_pretrained(build_tiny_model(f"{tmp}/tiny"), max_pixels=3136)
        examples, _ = load_examples(
            make_synthetic(f"{tmp}/synthetic", seed=0, n_train=args.pairs, n_test=1)["train"]
        )
        prompts = [tiny.encode(side) for e in examples[: args.pairs] for side in (e.query, e.positive)]
        rows.append(("tiny", 1, step_bytes(prompts, groups(rng, len(prompts), args.g, 8, 32, 400), 1)))

        path = build_qwen2_vl(f"{tmp}/2b", layers=1)
        _, tokenizer = load_model(path, weights=False)  # a stock checkpoint: the UME tokens added on load
        big = UMEProcessor(tokenizer, load_image_processor(path, 1003520))
        image = Image.fromarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8))
        prompts = []
        for i in range(args.pairs):
            prompts.append(big.encode(Side(text=f"what is in picture {i}?", images=[image])))
            prompts.append(big.encode(Side(text=f"an answer about picture {i}")))
        responses = groups(rng, len(prompts), args.g, 64, 1024, 150_000)
        rows.append(("2b", 2, step_bytes(prompts, responses, 2)))
    print(f"{'profile':8} {'ranks':>5} " + " ".join(f"{c:>20}" for c in (*CALLS, "once", "total")))
    for name, ranks, measured in rows:
        cells = " ".join(f"{measured[c] / 2**20:17.2f} MB" for c in (*CALLS, "once", "total"))
        print(f"{name:8} {ranks:>5} {cells}")


if __name__ == "__main__":
    main()
