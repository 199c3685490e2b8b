"""Retrieval evaluation (MMEB-style): discriminative, generative and oracle scores, and pass@k.

Every distinct side (query or candidate, over all datasets of the config, `ume_r1.eval.datasets`) is
embedded once per mode, then each dataset's queries are scored against their candidates.

    python -m ume_r1.eval.evaluate --model DIR --config CFG.yaml --out RUN_DIR [--pass-k 8 --temperature 1.0]
    python -m ume_r1.eval.evaluate --make-synthetic-config OUT_DIR --synthetic-test test.parquet
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import BadRowError, RowProblem, Side
from ume_r1.data.template import swap_reasoning
from ume_r1.eval.datasets import EvalDataset, EvalRow, SideTable, load_config, load_dataset
from ume_r1.eval.embed import Embedder, Embeddings
from ume_r1.eval.metrics import (
    aggregate,
    chance_level,
    instance_score,
    mean,
    oracle,
    pass_at_k_curve,
    reasoning_sensitivity,
    within_group_cosine,
)
from ume_r1.eval.report import results_markdown, write_outputs
from ume_r1.eval.synthetic_config import make_synthetic_eval
from ume_r1.model.device import resolve_device, resolve_dtype
from ume_r1.model.hf_checkpoint import load_model

log = logging.getLogger(__name__)

MODES = ("disc", "gen")
CROSS_MODES = (("gen", "disc"), ("disc", "gen"))  # (query mode, candidate mode): scores gen2disc, disc2gen


# ------------------------------------------------------------------------------------------- config + data


# ------------------------------------------------------------------------------------------------ scoring


def score_queries(
    emb: torch.Tensor,
    query_idx: Sequence[int],
    cand_idx: Sequence[Sequence[int]],
    rows: Sequence[EvalRow],
    metric: str,
    cand_emb: torch.Tensor | None = None,
) -> list[float]:
    """Per-query scores; `emb` rows are the side table's (L2-normalised) embeddings, the candidates'
    too unless `cand_emb` (the same table embedded in another mode: cross-mode retrieval) is given."""
    cand_emb = emb if cand_emb is None else cand_emb
    return [
        instance_score(metric, cand_emb[list(cands)] @ emb[q], row.labels)
        for q, cands, row in zip(query_idx, cand_idx, rows, strict=True)
    ]


def sampled_hits(
    samples: torch.Tensor, cand_emb: torch.Tensor, cand_idx: Sequence[Sequence[int]], rows: Sequence[EvalRow]
) -> np.ndarray:
    """(queries, n) Hit@1 of each sampled query embedding; `samples` is (queries, n, D)."""
    return np.array(
        [
            [instance_score("hit@1", cand_emb[list(cands)] @ s, row.labels) > 0 for s in sample]
            for sample, cands, row in zip(samples, cand_idx, rows, strict=True)
        ],
        dtype=bool,
    )


def embed_sides(embedder: Embedder, sides: list[Side], modes: Sequence[str]) -> Embeddings:
    # A greedy generative pass yields the discriminative embedding from the same forward (the prompt is a
    # causal prefix), so disc needs a separate pass only when gen is not asked for.
    if "gen" in modes:
        return embedder.gen(sides)
    return embedder.disc(sides)


def evaluate(
    model_dir: str,
    config: str,
    modes: Sequence[str] = MODES,
    pass_k_samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    max_queries: int | None = None,
    pass_k_max_queries: int | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
    rollout: str = "hf",
) -> dict[str, Any]:
    """Evaluate `model_dir` on the datasets of `config`; returns every number (see `write_outputs`).

    Hit@1 / NDCG@5 use greedy generations; pass@k (k = 1..pass_k_samples) samples that many generations
    per query at `temperature` and counts Hit@1 hits against the greedy generative candidate embeddings.
    """
    modes = list(dict.fromkeys(modes))
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    if pass_k_samples and "gen" not in modes:
        raise ValueError("pass@k samples generative embeddings: add 'gen' to modes or set pass_k_samples=0")
    specs = load_config(config)
    # The processor check comes first: it names the directory when the tokenizer lacks the UME tokens.
    processor = UMEProcessor.from_pretrained(model_dir, max_pixels=max_pixels)
    datasets = [load_dataset(spec, max_queries) for spec in specs]

    table = SideTable()
    query_idx, cand_idx = {}, {}
    for d in datasets:
        for r in d.rows:
            try:  # hashing a side decodes its media: the first place a corrupt image shows
                query_idx.setdefault(d.spec.name, []).append(table.add(r.query))
                cand_idx.setdefault(d.spec.name, []).append([table.add(c) for c in r.candidates])
            except RowProblem as e:
                raise BadRowError(f"dataset '{d.spec.name}': {r.where}: {e}") from None
    occurrences = sum(len(d.rows) + sum(len(r.candidates) for r in d.rows) for d in datasets)
    log.info("%d datasets, %d distinct sides (%d occurrences)", len(datasets), len(table.sides), occurrences)

    dev = resolve_device(device)
    model, _ = load_model(model_dir, dev, resolve_dtype("auto", dev))
    embedder = Embedder(
        model, processor, dev, batch_size, max_new_tokens, temperature, rollout=rollout, model_dir=model_dir
    )
    emb = embed_sides(embedder, table.sides, modes)
    # Scores in fp32: bf16 (GPU) dot products would round near-equal similarities into ties.
    by_mode = {"disc": emb.disc.float(), "gen": emb.gen.float() if emb.gen is not None else None}

    per_query: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for d in datasets:
        name = d.spec.name
        for m in modes:
            per_query[m][name] = score_queries(
                by_mode[m], query_idx[name], cand_idx[name], d.rows, d.spec.metric
            )
    if len(modes) == 2:
        per_query["oracle"] = {
            n: oracle(per_query["disc"][n], per_query["gen"][n]).tolist() for n in query_idx
        }
        # one space? queries embedded one way against candidates embedded the other way
        for query_mode, cand_mode in CROSS_MODES:
            per_query[f"{query_mode}2{cand_mode}"] = {
                d.spec.name: score_queries(
                    by_mode[query_mode],
                    query_idx[d.spec.name],
                    cand_idx[d.spec.name],
                    d.rows,
                    d.spec.metric,
                    by_mode[cand_mode],
                )
                for d in datasets
            }
    scores = {m: {n: mean(v) for n, v in per_query[m].items()} for m in per_query}
    scores["chance"] = {
        d.spec.name: mean([chance_level(d.spec.metric, len(r.candidates), len(r.labels)) for r in d.rows])
        for d in datasets
    }
    meta = {d.spec.name: d.spec.meta_task for d in datasets}
    summary = {m: aggregate(s, meta) for m, s in scores.items()}

    results: dict[str, Any] = {
        "model": model_dir,
        "config": os.path.abspath(config),
        "settings": {
            "modes": modes,
            "pass_k_samples": pass_k_samples,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "device": str(dev),
            "max_queries": max_queries,
            "pass_k_max_queries": pass_k_max_queries,
            "seed": seed,
            "tie_rule": "ties broken against relevant candidates (a tie with an irrelevant one is a miss)",
        },
        "datasets": [
            {
                **asdict(d.spec),
                "n_queries": len(d.rows),
                "mean_candidates": mean([len(r.candidates) for r in d.rows]),
                "mean_relevant": mean([len(r.labels) for r in d.rows]),
            }
            for d in datasets
        ],
        "scores": scores,
        "meta_tasks": {m: s["meta_tasks"] for m, s in summary.items()},
        "overall": {m: s["overall"] for m, s in summary.items()},
        "per_query": per_query,
        "sides": {"distinct": len(table.sides), "occurrences": occurrences},
        "pass_at_k": None,
    }
    if "gen" in modes:
        responses = emb.responses or []
        results["generation"] = {
            "format_rate": emb.format_rate(),
            "gen_emb_rate": float(emb.has_gen_emb.float().mean()) if emb.has_gen_emb is not None else 0.0,
            "reasoning_sensitivity": reasoning_probe(embedder, table.sides, emb),
            "examples": responses[:3],
        }
    if pass_k_samples:
        results["pass_at_k"] = _pass_at_k(
            embedder,
            datasets,
            table,
            query_idx,
            cand_idx,
            by_mode["gen"],
            pass_k_samples,
            pass_k_max_queries,
            seed,
        )
        results["pass_at_k"]["temperature"] = temperature
    return results


def reasoning_probe(embedder: Embedder, sides: list[Side], emb: Embeddings) -> float | None:
    """Reasoning sensitivity of the greedy generations: the mean cosine between each side's generative
    embedding and that of its own response with the <think> text of the next side's response
    (ume_r1.eval.metrics.reasoning_sensitivity; 1: the reasoning does not move the embedding).
    None when no response has both a <think> block and a <gen_emb>."""
    texts = emb.responses or []
    swapped = [swap_reasoning(text, texts[(i + 1) % len(texts)]) for i, text in enumerate(texts)]
    kept = [i for i, text in enumerate(swapped) if text is not None]
    if not kept or emb.gen is None or emb.has_gen_emb is None:
        return None
    probe, probe_has = embedder.embed_responses([sides[i] for i in kept], [swapped[i] for i in kept])
    valid = probe_has & emb.has_gen_emb[kept]
    value = reasoning_sensitivity(emb.gen[kept], probe, valid)
    return None if math.isnan(value) else value


def _pass_at_k(
    embedder: Embedder,
    datasets: list[EvalDataset],
    table: SideTable,
    query_idx: dict[str, list[int]],
    cand_idx: dict[str, list[list[int]]],
    cand_emb: torch.Tensor,
    n: int,
    max_queries: int | None,
    seed: int,
) -> dict[str, Any]:
    # Only queries are sampled: candidates keep their greedy generative embedding, as a deployed index would.
    used = {d.spec.name: len(d.rows[:max_queries] if max_queries else d.rows) for d in datasets}
    distinct = list(dict.fromkeys(q for d in datasets for q in query_idx[d.spec.name][: used[d.spec.name]]))
    sampled = embedder.gen([table.sides[q] for q in distinct], do_sample=True, n=n, seed=seed)
    per_query = sampled.gen.float().reshape(len(distinct), n, -1)  # rows are side-major: side i, sample j
    where = {q: i for i, q in enumerate(distinct)}
    curves, hits_out = {}, {}
    for d in datasets:
        name, k = d.spec.name, used[d.spec.name]
        samples = per_query[[where[q] for q in query_idx[name][:k]]]
        hits = sampled_hits(samples, cand_emb, cand_idx[name][:k], d.rows[:k])
        curves[name] = pass_at_k_curve(hits)
        hits_out[name] = hits.sum(axis=1).tolist()
    return {
        "n": n,
        "k": list(range(1, n + 1)),
        "per_dataset": curves,
        "mean": [mean([c[i] for c in curves.values()]) for i in range(n)],
        "n_queries": used,
        "hits_per_query": hits_out,  # c out of n per query, the estimator's input
        "sampled_format_rate": sampled.format_rate(),
        # how alike a query's n sampled embeddings are (1: the samples collapsed to one response)
        "within_query_cosine": within_group_cosine(
            sampled.gen.float(), torch.arange(len(distinct)).repeat_interleave(n)
        ),
    }


# ------------------------------------------------------------------------------------- synthetic eval set


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="UME model directory (HF checkpoint with <disc_emb>/<gen_emb>)")
    parser.add_argument("--config", help="eval config (YAML/JSON) listing the datasets")
    parser.add_argument("--out", help="run directory for results.json, results.md and plots")
    parser.add_argument("--modes", default="disc,gen", help="comma-separated subset of disc,gen")
    parser.add_argument("--pass-k", type=int, default=0, help="samples per query for pass@k (0: off)")
    parser.add_argument("--pass-k-max-queries", type=int, default=None, help="queries per dataset for pass@k")
    parser.add_argument("--max-queries", type=int, default=None, help="first N queries of each dataset")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout", default="hf", choices=["hf", "vllm"], help="generation backend")
    parser.add_argument(
        "--make-synthetic-config", metavar="OUT_DIR", help="write synthetic eval files + config"
    )
    parser.add_argument("--synthetic-test", help="synthetic test.parquet (with --make-synthetic-config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.make_synthetic_config:
            if not args.synthetic_test:
                parser.error("--make-synthetic-config needs --synthetic-test PATH")
            print(make_synthetic_eval(args.synthetic_test, args.make_synthetic_config))
            return 0
        if not (args.model and args.config and args.out):
            parser.error("--model, --config and --out are required")
        results = evaluate(
            args.model,
            args.config,
            modes=[m.strip() for m in args.modes.split(",") if m.strip()],
            pass_k_samples=args.pass_k,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=args.device,
            max_queries=args.max_queries,
            pass_k_max_queries=args.pass_k_max_queries,
            max_pixels=args.max_pixels,
            seed=args.seed,
            rollout=args.rollout,
        )
    except (FileNotFoundError, ValueError) as e:
        # Config, data and model-directory problems are the user's to fix: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(results, args.out)
    sys.stdout.write(results_markdown(results))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
