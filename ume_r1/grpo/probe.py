"""The reasoning-sensitivity probe of a GRPO step: every response again, its <think> text replaced by that
of the same-numbered response of another input (the next prompt that is not its positive). The learner
embeds the swapped responses; `ume_r1.eval.metrics.reasoning_sensitivity` compares them with the
responses' own embeddings (1: the reasoning does not move the embedding)."""

from __future__ import annotations

import numpy as np
import torch

from ume_r1.data.template import swap_reasoning
from ume_r1.grpo.grouping import StepPrompts


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
