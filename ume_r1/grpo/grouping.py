"""Who is relevant to whom in one GRPO step: the prompts to sample and their relations.

Every example contributes a query prompt; targets (positives and explicit negatives) are
de-duplicated, so identical target prompts in a batch are generated once. Relations are kept
per prompt, which is what the reward sees (ume_r1.reward.batch.RewardBatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ume_r1.data.processor import EncodedPrompt, UMEProcessor
from ume_r1.data.rl_rows import Example


@dataclass
class EncodedExample:
    """An example's sides as model inputs: what a data worker hands the step."""

    query: EncodedPrompt
    positive: EncodedPrompt
    negatives: list[EncodedPrompt]


def encode_example(
    example: Example, processor: UMEProcessor, truncate: bool = False
) -> tuple[EncodedExample, bool]:
    """Every side of `example` encoded (media decoded here); whether a prompt was cut to fit
    `data.max_prompt_length` (`truncate`) or, without `truncate`, `TooLong`."""
    sides = [example.query, example.positive, *example.negatives]
    prompts = [processor.encode(side, truncate) for side in sides]
    cut = any(p.truncated for p in prompts)
    return EncodedExample(prompts[0], prompts[1], prompts[2:]), cut


@dataclass
class StepPrompts:
    prompts: list[EncodedPrompt] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)
    negatives: list[list[int]] = field(default_factory=list)
    in_batch_negatives: list[list[int]] = field(default_factory=list)
    query_of_example: list[int] = field(default_factory=list)
    positive_of_example: list[int] = field(default_factory=list)

    def _add(self, prompt: EncodedPrompt, role: str) -> int:
        self.prompts.append(prompt)
        self.roles.append(role)
        for rel in (self.positives, self.negatives, self.in_batch_negatives):
            rel.append([])
        return len(self.prompts) - 1


def plan_prompts(examples: Sequence[EncodedExample]) -> StepPrompts:
    plan = StepPrompts()
    target_ids: dict[tuple, int] = {}

    def target(prompt: EncodedPrompt) -> int:
        key = prompt.key()
        if key not in target_ids:
            target_ids[key] = plan._add(prompt, "target")
        return target_ids[key]

    explicit: list[list[int]] = []
    for ex in examples:
        q = plan._add(ex.query, "query")
        pos = target(ex.positive)
        plan.query_of_example.append(q)
        plan.positive_of_example.append(pos)
        explicit.append([t for t in dict.fromkeys(target(n) for n in ex.negatives) if t != pos])

    targets = [i for i, r in enumerate(plan.roles) if r == "target"]
    for q, pos, negs in zip(plan.query_of_example, plan.positive_of_example, explicit, strict=True):
        plan.positives[q] = [pos]
        plan.negatives[q] = negs
        plan.in_batch_negatives[q] = [t for t in targets if t != pos and t not in negs]
        plan.positives[pos].append(q)
        for t in negs:
            plan.negatives[t].append(q)
    queries = plan.query_of_example
    for t in targets:
        related = set(plan.positives[t]) | set(plan.negatives[t])
        plan.in_batch_negatives[t] = [q for q in queries if q not in related]
    return plan
