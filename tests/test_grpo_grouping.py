"""Prompt planning for one GRPO step: roles, positives and negatives of each prompt, identical targets
generated once."""

from __future__ import annotations

from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import Example
from ume_r1.data.rows import Side
from ume_r1.grpo.grouping import encode_example, plan_prompts


def test_plan_prompts_relations(processor: UMEProcessor) -> None:
    examples = [
        Example(Side("q0"), Side("target A"), [Side("target B")], "t", 0),
        Example(Side("q1"), Side("target A"), [Side("target C")], "t", 1),
        Example(Side("q2"), Side("target B"), [], "t", 2),
    ]
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples])
    # q0=0, A=1, B=2, q1=3, C=4, q2=5: A shared by q0 and q1 is generated once.
    assert plan.roles == ["query", "target", "target", "query", "target", "query"]
    assert plan.query_of_example == [0, 3, 5]
    assert plan.positive_of_example == [1, 1, 2]
    assert plan.prompts[1].input_ids == processor.encode(Side("target A")).input_ids
    assert plan.prompts[4].input_ids == processor.encode(Side("target C")).input_ids

    q0, a, b, q1, c, q2 = range(6)
    assert plan.positives[q0] == [a] and plan.negatives[q0] == [b] and plan.in_batch_negatives[q0] == [c]
    assert plan.positives[q1] == [a] and plan.negatives[q1] == [c] and plan.in_batch_negatives[q1] == [b]
    assert plan.positives[q2] == [b] and plan.negatives[q2] == [] and plan.in_batch_negatives[q2] == [a, c]
    # Targets: symmetric relations.
    assert plan.positives[a] == [q0, q1] and plan.negatives[a] == [] and plan.in_batch_negatives[a] == [q2]
    assert plan.positives[b] == [q2] and plan.negatives[b] == [q0] and plan.in_batch_negatives[b] == [q1]
    assert plan.positives[c] == [] and plan.negatives[c] == [q1] and plan.in_batch_negatives[c] == [q0, q2]
    # No prompt is ever both related and an in-batch negative of another.
    for i in range(6):
        related = set(plan.positives[i]) | set(plan.negatives[i])
        assert not related & set(plan.in_batch_negatives[i])


def test_plan_prompts_drops_negative_equal_to_positive(processor: UMEProcessor) -> None:
    examples = [Example(Side("q"), Side("same"), [Side("same"), Side("other"), Side("other")], "t", 0)]
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples])
    assert plan.roles == ["query", "target", "target"]
    assert plan.positives[0] == [1] and plan.negatives[0] == [2] and plan.in_batch_negatives[0] == []
