"""The learner worker in this process (one gloo rank, no Ray): forward outputs, GRPO advantages, and
that one update moves log-probs in the direction of the advantages."""

from __future__ import annotations

import pytest
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import kl_penalty

from ume_r1.data.collate import pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import Side
from ume_r1.grpo.advantages import drop_flat_groups, grpo_advantages
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.model.policy import token_log_probs


def reference_advantages(rewards: list[float], groups: list[int], eps: float = 1e-6) -> list[float]:
    """(r - mean) / (unbiased std + eps) within each group, written out."""
    out = []
    for r, g in zip(rewards, groups, strict=True):
        members = [x for x, h in zip(rewards, groups, strict=True) if h == g]
        mean = sum(members) / len(members)
        std = (sum((x - mean) ** 2 for x in members) / (len(members) - 1)) ** 0.5
        out.append((r - mean) / (std + eps))
    return out


def test_grpo_advantages_match_reference():
    rewards = torch.tensor([0.3, -0.1, 0.9, 0.0, 1.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[0, 3:] = 0  # ragged responses: the advantage covers exactly the response tokens
    adv = grpo_advantages(rewards, mask, groups)
    expected = torch.tensor(reference_advantages(rewards.tolist(), groups.tolist()))
    torch.testing.assert_close(adv[:, 0], expected)
    assert torch.equal(adv[0, 3:], torch.zeros(2))
    assert torch.allclose(adv[1], adv[1, :1].expand(5))


def test_zero_variance_filter_drops_exactly_the_flat_groups():
    # prompts 0 and 2 have G equal rewards (2 is all 0: e.g. no response formatted); 1 and 3 differ
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.9, 0.0, 0.0, 0.2, 0.2, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    data = DataProto.from_dict(tensors={"row": torch.arange(10), "response_mask": torch.ones(10, 4)})
    kept = drop_flat_groups(data, rewards, groups)
    assert kept.batch["row"].tolist() == [3, 4, 7, 8, 9]
    assert len(drop_flat_groups(data, torch.zeros(10), groups)) == 0


def test_update_follows_the_advantages(learner, tiny_model_dir):
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    prompts = [processor.encode(Side(text="a red circle")), processor.encode(Side(text="a blue star"))]
    tok = processor.tokenizer
    # Disjoint token sets, so one response's update does not drag another along through shared rows.
    answers = [
        "<think>red round</think><answer>red circle<gen_emb>",
        "yellow purple",
        "green square",
        "<think>blue</think><answer>star<gen_emb>",
    ]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    responses = [[ids[0], ids[1]], [ids[2], ids[3]]]
    data, prompt_index = build_sequences(prompts, responses)

    first = learner.compute_log_prob(data)
    assert first.batch["embeddings"].shape == (4, 64)
    assert first.batch["has_gen_emb"].tolist() == [True, False, False, True]
    data.union(first)
    data.union(learner.compute_ref_log_prob(data))
    torch.testing.assert_close(data.batch["ref_log_prob"], data.batch["old_log_probs"])

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    data.batch["advantages"] = grpo_advantages(rewards, data.batch["response_mask"], prompt_index)
    data.meta_info["seed"] = 0
    metrics = learner.update_actor(data).meta_info["metrics"]
    assert metrics["actor/pg_loss"] != 0 and metrics["actor/grad_norm"] > 0

    after = learner.compute_log_prob(data)
    mask = data.batch["response_mask"].float()
    before_seq = (data.batch["old_log_probs"] * mask).sum(1)
    after_seq = (after.batch["old_log_probs"] * mask).sum(1)
    gained = after_seq - before_seq
    assert gained[0] > 0 and gained[3] > 0, gained
    assert gained[1] < 0 and gained[2] < 0, gained
    kl = kl_penalty(after.batch["old_log_probs"], data.batch["ref_log_prob"], "low_var_kl")
    assert float((kl * mask).sum()) > 0


@pytest.mark.parametrize("chunk_tokens", [7, 1024])
def test_chunked_log_probs_and_entropy_equal_the_plain_formula(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(500, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 500, (3, 13))
    upstream = torch.randn(3, 13, dtype=torch.float64)
    # The plain formula: full logits, log-softmax, gather; entropy -sum p log p.
    logp_full = torch.log_softmax((hidden @ weight.T) / 0.7, dim=-1)
    plain = logp_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    plain_entropy = -(logp_full.exp() * logp_full).sum(-1)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))

    got, entropy = token_log_probs(hidden, weight, targets, 0.7, chunk_tokens, with_entropy=True)
    torch.testing.assert_close(got, plain.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, plain_entropy.float(), rtol=0, atol=1e-5)
    grads = torch.autograd.grad((got.double() * upstream).sum(), (hidden, weight))
    for mine, theirs in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        no_entropy = token_log_probs(hidden, weight, targets, 0.7, chunk_tokens)
    assert no_entropy[1] is None and torch.equal(no_entropy[0], got.detach())
    # no positions at all (a micro-batch of padding rows): empty, still attached to the weights
    none, _ = token_log_probs(hidden[:, :0], weight, targets[:, :0], 0.7, chunk_tokens)
    assert none.shape == (3, 0) and none.requires_grad


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, synthetic_dir):
    from ume_r1.data.collate import media_inputs
    from ume_r1.data.rl_rows import load_examples
    from ume_r1.model.device import enable_gradient_checkpointing
    from ume_r1.model.hf_checkpoint import load_model
    from ume_r1.model.policy import EmbeddingPolicy

    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(synthetic_dir["train"])
    prompts = [processor.encode(ex.query) for ex in examples[:3]]  # with images: the vision tower too
    tok = processor.tokenizer
    responses = [
        [tok(f"<think>{w}</think><answer>{w}<gen_emb>", add_special_tokens=False)["input_ids"]]
        for w in ("red", "blue star", "a green square")
    ]
    batch = pack_sequences(prompts, [group[0] for group in responses], processor.pad_id)
    grads = []
    for setting in (False, True):
        model, _ = load_model(tiny_model_dir)
        assert enable_gradient_checkpointing(model, setting, torch.device("cpu")) == setting
        assert model.is_gradient_checkpointing == setting
        policy = EmbeddingPolicy(model, processor.gen_emb_id).train()
        out = policy(**batch, **media_inputs(prompts), with_entropy=False)
        ((out["log_probs"] * batch["response_mask"]).sum() + out["embeddings"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_logged_losses_are_true_means_whatever_the_micro_batching(learner, tiny_model_dir):
    """Fresh old log-probs make every ratio 1, so the PPO loss is exactly -token-mean(advantages) and the
    KL to an identical reference is 0; four micro-batches must log that, not a quarter of it."""
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    prompts = [processor.encode(Side(text="a red circle")), processor.encode(Side(text="a blue star"))]
    words = [["red", "a round red shape"], ["blue five points", "star"]]
    responses = [[tok(w, add_special_tokens=False)["input_ids"] for w in pair] for pair in words]
    data, _ = build_sequences(prompts, responses)
    data.union(learner.compute_log_prob(data))
    data.union(learner.compute_ref_log_prob(data))
    mask = data.batch["response_mask"].float()
    data.batch["advantages"] = mask * torch.tensor([[1.5], [-0.5], [0.25], [-2.0]])
    data.meta_info["seed"] = 0
    learner.config.actor.micro_batch_size_per_gpu = 1
    learner.config.actor.use_dynamic_bsz = False
    metrics = learner.update_actor(data).meta_info["metrics"]
    expected = -float((data.batch["advantages"] * mask).sum() / mask.sum())
    assert metrics["actor/pg_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    learner.config.actor.ppo_mini_batch_size = 3  # responses per optimizer step over all ranks (one here)
    assert learner._mini_batch_rows(4) == 3


def test_a_non_finite_gradient_skips_the_optimizer_step():
    from ume_r1.training.fsdp import clip_and_step

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    for bad in (float("inf"), float("nan")):
        layer.weight.grad = torch.full_like(layer.weight, bad)
        layer.bias.grad = torch.ones_like(layer.bias)
        norm, stepped = clip_and_step(layer.parameters(), optimizer, max_norm=1.0)
        assert not stepped and not torch.isfinite(torch.tensor(norm))
        assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))
    layer.weight.grad = torch.full_like(layer.weight, 3.0)
    layer.bias.grad = torch.ones_like(layer.bias)  # clipping by a NaN norm made it NaN
    norm, stepped = clip_and_step(layer.parameters(), optimizer, max_norm=1.0)
    assert stepped and norm == pytest.approx((6 * 9 + 2) ** 0.5)
    clipped = layer.weight.detach() - before[0]
    torch.testing.assert_close(clipped, torch.full_like(clipped, -0.1 * 3.0 / norm))


def test_on_policy_update_equals_the_one_after_a_separate_forward(tiny_model_dir, mixed_batch, single_rank):
    """An on-policy step (one epoch, one mini-batch) sends no old log-probs: the update's own forward,
    detached, stands in for them. Against the same update after `compute_log_prob`: the log-probs and
    entropy it returns equal that forward's, and the updated weights equal its update's (the two
    forwards pack micro-batches differently: fp32 rounding only). The embeddings-only forward gives the
    embeddings of the full one."""
    from conftest import full, make_learner, scored

    _, data = mixed_batch
    separate, on_policy = make_learner(tiny_model_dir), make_learner(tiny_model_dir)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -2.0])
    scored(separate, data, advantages)
    before = data.batch["old_log_probs"].clone(), data.batch["entropy"].clone()
    separate.update_actor(data)

    lean = data.select(batch_keys=["response_mask", "ref_log_prob", "advantages"], deepcopy=True)
    on_policy.config.actor.grad_clip = separate.config.actor.grad_clip
    embeddings = on_policy.compute_forwards(
        DataProto(lean.batch, lean.non_tensor_batch, {**lean.meta_info, "policy": "embeddings"})
    )
    assert set(embeddings.batch.keys()) == {"embeddings", "has_gen_emb"}
    torch.testing.assert_close(embeddings.batch["embeddings"], data.batch["embeddings"], rtol=0, atol=1e-6)
    out = on_policy.update_actor(lean)
    mask = data.batch["response_mask"].bool()
    for got, expected in zip((out.batch["old_log_probs"], out.batch["entropy"]), before, strict=True):
        torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
        assert not got[~mask].any()
    assert out.meta_info["weights_changed"]
    for (name, a), b in zip(separate.policy.named_parameters(), on_policy.policy.parameters(), strict=True):
        torch.testing.assert_close(full(a), full(b), rtol=0, atol=1e-6, msg=name)

    on_policy.config.actor.ppo_epochs = 2  # a second epoch is off-policy: it needs the recorded ones
    with pytest.raises(ValueError, match="ppo_epochs=2"):
        on_policy.update_actor(lean)


def test_a_step_without_an_optimizer_step_needs_no_standalone_sync(learner, mixed_batch):
    """A non-finite gradient leaves the weights as they were (`weights_changed` false), so standalone
    engines keep theirs; the hybrid hf engine never needs a sync, hybrid vLLM always gets one."""
    from types import SimpleNamespace

    from conftest import scored

    from ume_r1.grpo.trainer import GRPOTrainer

    _, data = mixed_batch
    scored(learner, data, float("nan"))
    assert not learner.update_actor(data).meta_info["weights_changed"]
    scored(learner, data, 1.0)
    assert learner.update_actor(data).meta_info["weights_changed"]

    def needs_sync(hybrid: bool, name: str, changed: bool) -> bool:
        trainer = SimpleNamespace(hybrid=hybrid, cfg=SimpleNamespace(rollout=SimpleNamespace(name=name)))
        return GRPOTrainer.needs_sync(trainer, changed)

    assert [needs_sync(False, "hf", c) for c in (True, False)] == [True, False]
    assert [needs_sync(True, "vllm", c) for c in (True, False)] == [True, True]
    assert not needs_sync(True, "hf", True)
