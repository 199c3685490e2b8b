"""The reasoning-sensitivity probe of a GRPO step: every response again, its <think> text replaced by that
of the same-numbered response of another input (the next prompt that is not its positive). The learner
embeds the swapped responses; `ume_r1.eval.metrics.reasoning_sensitivity` compares them with the
responses' own embeddings (1: the reasoning does not move the embedding).

Besides that diagnostic, `algorithm.reasoning_bonus_coef` (off by default) adds coef x
`reasoning_dependence` to each response's reward: among one prompt's G responses, GRPO then favours
those whose embedding depends on their reasoning. `within_group_correlation` of the dependence with the
reward (`ume_r1.grpo.step_metrics.reasoning_metrics`) tells whether the reward alone pushes the
other way."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ume_r1.data.template import swap_reasoning
from ume_r1.grpo.grouping import StepPrompts
from ume_r1.grpo.learner_batch import build_sequences, pad_for_ranks, share_prompts


def swapped_responses(
    plan: StepPrompts, responses: list[list[list[int]]], texts: list[str], tokenizer
) -> tuple[list[list[list[int]]], torch.Tensor]:
    """The probe's responses, grouped per prompt as `responses` are, and which rows were swapped (a
    response without a <think> block, or whose donor has none, stays itself and is left out)."""
    count = len(responses)
    starts = np.cumsum([0] + [len(group) for group in responses])
    flat = [r for group in responses for r in group]

    def donor(p: int) -> int:
        others = [(p + d) % count for d in range(1, count)]
        return next((q for q in others if q not in plan.positives[p]), others[0] if others else p)

    donors = [donor(p) for p in range(count)]  # once per prompt, not per response
    rows = [
        starts[donors[p]] + k % len(responses[donors[p]])
        for p, group in enumerate(responses)
        for k in range(len(group))
    ]
    swapped = [swap_reasoning(text, texts[d]) for text, d in zip(texts, rows, strict=True)]
    ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"] if t is not None else own
        for t, own in zip(swapped, flat, strict=True)
    ]
    grouped = [ids[starts[p] : starts[p + 1]] for p in range(count)]
    return grouped, torch.tensor([t is not None for t in swapped])


def embed_swapped(
    learners,
    plan: StepPrompts,
    responses: list[list[list[int]]],
    texts: list[str],
    tokenizer,
    shared,
    step: int,
    num_workers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learners' generative embeddings of the swapped responses (one embeddings-only forward) and
    which rows count: swapped, and with a `<gen_emb>` in the swapped response."""
    grouped, swapped = swapped_responses(plan, responses, texts, tokenizer)
    probe, _ = build_sequences(plan.prompts, grouped)
    share_prompts(probe, shared)
    probe.meta_info.update(seed=step, policy="embeddings", ref=False, stage="probe")
    out = learners.compute_forwards(pad_for_ranks(probe, num_workers))[: len(probe)]
    return out.batch["embeddings"], swapped & out.batch["has_gen_emb"].bool()


def reasoning_dependence(
    embeddings: torch.Tensor, swapped: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(N,) 1 - cos(own embedding, swapped one): how far each response's embedding moves when its
    <think> text is another input's; NaN where not `valid`. Its mean over valid rows is 1 minus
    `ume_r1.eval.metrics.reasoning_sensitivity`."""
    moved = 1 - F.cosine_similarity(embeddings.float(), swapped.float(), dim=-1)
    return torch.where(valid, moved, torch.nan)
