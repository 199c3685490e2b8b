"""Why did held-out generative retrieval change between two checkpoints (SFT and GRPO)? Separates a
change of the generated text from a drift of the representation.

Both models generate greedy responses for every side of an evaluation config; each model then embeds
both sets of responses (teacher forced), so four Hit@1 figures result:

    model A on A's text   (A's own evaluation)        model B on A's text   (representation drift)
    model A on B's text   (text change)               model B on B's text   (B's own evaluation)

Deltas against A-on-A are paired over the same queries, with their standard errors. It also prints
how often each model's greedy summary of a query (the `<answer>` text) equals its summary of the
query's relevant candidate: whether the reasoning reaches the right answer, apart from the embedding.

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/rl_text_or_drift.py SFT_DIR GRPO_DIR EVAL_YAML \
        [--max-pixels 3136] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ume_r1.data.collate import media_inputs, pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.eval.datasets import SideTable, load_config, load_dataset
from ume_r1.eval.evaluate import score_queries
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.rollout.factory import rollout_config
from ume_r1.rollout.hf import HFRollout  # noqa: E402

BATCH = 32
SUMMARY_RE = re.compile(r"<answer>(.*?)(?:</answer>)?\s*<gen_emb>", re.DOTALL)


def summary(text: str) -> str | None:
    found = SUMMARY_RE.search(text)
    return found[1].strip() if found else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("config")
    parser.add_argument("--max-pixels", type=int, default=3136)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    processor = UMEProcessor.from_pretrained(args.model_a, max_pixels=args.max_pixels)
    datasets = [load_dataset(spec) for spec in load_config(args.config)]
    table = SideTable()
    queries = {d.spec.name: [table.add(r.query) for r in d.rows] for d in datasets}
    candidates = {d.spec.name: [[table.add(c) for c in r.candidates] for r in d.rows] for d in datasets}
    prompts = [processor.encode(side) for side in table.sides]
    greedy = rollout_config(
        name="hf",
        device="cpu",
        micro_batch_size=BATCH,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        response_length=args.max_new_tokens,
        enforce_eager=True,
        free_cache_engine=False,
        cpu_kvcache_space_gb=1,
    )

    def generate(model) -> list[list[int]]:
        engine = HFRollout(model, processor.tokenizer, greedy, torch.device("cpu"))
        return [
            group[0]
            for start in range(0, len(prompts), BATCH)
            for group in engine.generate(prompts[start : start + BATCH], n=1, seed=0, do_sample=False)
        ]

    @torch.no_grad()
    def embed(policy: EmbeddingPolicy, responses: list[list[int]]) -> torch.Tensor:
        parts = []
        for start in range(0, len(prompts), BATCH):
            chunk, texts = prompts[start : start + BATCH], responses[start : start + BATCH]
            out = policy(
                **pack_sequences(chunk, texts, processor.pad_id), **media_inputs(chunk), with_entropy=False
            )
            parts.append(out["embeddings"].float())
        return torch.cat(parts)

    def hits(embeddings: torch.Tensor) -> np.ndarray:
        return np.concatenate(
            [
                score_queries(embeddings, queries[d.spec.name], candidates[d.spec.name], d.rows, "hit@1")
                for d in datasets
            ]
        )

    models, texts = {}, {}
    for name, path in (("A", args.model_a), ("B", args.model_b)):
        model, _ = load_model(path, "cpu", torch.float32)
        models[name] = EmbeddingPolicy(model.eval(), processor.gen_emb_id, processor.disc_emb_id)
        texts[name] = generate(model)
    same = np.mean([a == b for a, b in zip(texts["A"], texts["B"], strict=True)])
    print(f"A = {args.model_a}\nB = {args.model_b}")
    print(f"{len(prompts)} distinct sides; greedy responses identical between A and B: {100 * same:.1f}%")
    for name in ("A", "B"):
        said = [summary(processor.tokenizer.decode(r)) for r in texts[name]]
        agree = [
            said[q] is not None and said[q] == said[cands[row.labels[0]]]
            for d in datasets
            for q, cands, row in zip(queries[d.spec.name], candidates[d.spec.name], d.rows, strict=True)
        ]
        print(f"{name}: a query's summary equals its relevant candidate's: {100 * np.mean(agree):.1f}%")
    base = hits(embed(models["A"], texts["A"]))
    print("| model | text | gen Hit@1 | delta vs A on A (paired SE) |\n|---|---|---|---|")
    for model, text in (("A", "A"), ("B", "A"), ("A", "B"), ("B", "B")):
        score = hits(embed(models[model], texts[text]))
        delta = score - base
        se = delta.std(ddof=1) / np.sqrt(len(delta))
        print(
            f"| {model} | {text}'s | {100 * score.mean():.1f} | {100 * delta.mean():+.1f} +- {100 * se:.1f} |"
        )
    print(f"(n = {len(base)} queries)")


if __name__ == "__main__":
    main()
