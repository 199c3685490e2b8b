"""The learner's batching gives the padded path's numbers: unpadded rows packed per micro-batch to their
own longest row, token-budget (dynamic) micro-batches, and vision features computed once per prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import full
from torch.distributed.fsdp import FSDPModule

from ume_r1.data.collate import media_inputs, shared_media
from ume_r1.data.processor import EncodedPrompt
from ume_r1.grpo.learner_batch import build_sequences, pad_for_ranks
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.training.micro_batches import pack_rows, plan_micro_batches, row_lengths


def padded_tokens(rows, prompt_lens, response_lens) -> int:
    """A trimmed micro-batch's cost: rows x (longest prompt + longest response, at least 1)."""
    return len(rows) * (max(prompt_lens[i] for i in rows) + max(max(response_lens[i] for i in rows), 1))


def test_plan_micro_batches_fills_the_budget_and_keeps_every_row():
    prompt = [10, 50, 10, 30, 10, 10, 90]
    response = [5, 40, 2, 30, 8, 1, 100]
    groups = plan_micro_batches(prompt, response, max_tokens=130)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert groups[0] == [6]  # 190 tokens, over the budget: a micro-batch of its own
    assert all(padded_tokens(g, prompt, response) <= 130 for g in groups[1:])
    lengths = [prompt[i] + response[i] for g in groups for i in g]
    assert lengths == sorted(lengths, reverse=True)  # longest first, so neighbours pad little
    # Another rank needed more micro-batches: split until there are as many.
    more = plan_micro_batches(prompt, response, max_tokens=130, min_count=len(groups) + 2)
    assert len(more) == len(groups) + 2 and sorted(i for g in more for i in g) == list(range(7))
    # Fixed size: consecutive slices, so a prompt's responses stay together.
    assert plan_micro_batches(prompt, response, rows_per_micro=3) == [[0, 1, 2], [3, 4, 5], [6]]
    split = plan_micro_batches(prompt, response, rows_per_micro=3, min_count=4)
    assert split == [[0], [1, 2], [3, 4, 5], [6]]


def test_rows_travel_unpadded_and_pack_to_their_own_longest():
    prompts = [EncodedPrompt(input_ids=[1, 2]), EncodedPrompt(input_ids=[3])]
    data, _ = build_sequences(prompts, [[[4], [7, 8, 9]], [[5, 6]]])
    assert [r.tolist() for r in data.non_tensor_batch["response"]] == [[4], [7, 8, 9], [5, 6]]
    assert list(data.batch.keys()) == ["response_mask"] and data.batch["response_mask"].shape == (3, 3)
    padded = pad_for_ranks(data, 2)  # a fourth row, a copy with its mask zeroed
    assert row_lengths(padded, prompts) == ([2, 2, 1, 2], [1, 3, 2, 0])
    batch, rows = pack_rows(padded[[0, 2]], prompts, pad_id=0)
    assert rows == [prompts[0], prompts[1]]
    assert batch["input_ids"].tolist() == [[1, 2, 4, 0], [0, 3, 5, 6]]  # 2 prompt + 2 response columns
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    copy, _ = pack_rows(padded[[3]], prompts, pad_id=0)
    assert copy["input_ids"].tolist() == [[1, 2, 4]] and copy["response_mask"].tolist() == [
        [0]
    ]  # out of every loss


def test_vision_once_per_prompt_equals_vision_per_row(tiny_model_dir, mixed_batch):
    processor, data = mixed_batch
    batch, prompts = pack_rows(data, data.meta_info["prompts"], processor.pad_id)
    shared = shared_media(prompts)
    assert shared.row_prompt == [0, 0, 1, 1, 1, 2, 2] and shared.images_per_prompt == [1, 0, 1]
    results = []
    for media in ({**media_inputs(prompts)}, {"shared": shared}):
        model, _ = load_model(tiny_model_dir)
        policy = EmbeddingPolicy(model, processor.gen_emb_id).train()
        out = policy(**batch, **media, with_entropy=False)
        ((out["log_probs"] * batch["response_mask"]).sum() + out["embeddings"].sum()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (per_row, per_row_grads), (once, once_grads) = results
    assert any("visual" in n for n in once_grads) and per_row_grads.keys() == once_grads.keys()
    for key in ("log_probs", "embeddings"):
        torch.testing.assert_close(once[key], per_row[key], rtol=1e-5, atol=1e-6)
    for name, grad in per_row_grads.items():
        torch.testing.assert_close(once_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dynamic", [False, True])
def test_trimmed_micro_batches_equal_the_padded_forward(learner, tiny_model_dir, mixed_batch, dynamic):
    processor, data = mixed_batch
    model, _ = load_model(tiny_model_dir)
    plain = EmbeddingPolicy(model, processor.gen_emb_id).eval()
    batch, prompts = pack_rows(data, data.meta_info["prompts"], processor.pad_id)
    with torch.no_grad():
        want = plain(**batch, **media_inputs(prompts))

    rollout = learner.config.rollout
    rollout.log_prob_micro_batch_size_per_gpu = 2
    rollout.log_prob_use_dynamic_bsz = dynamic
    rollout.log_prob_max_token_len_per_gpu = 120  # several micro-batches, in length order
    assert len(learner._micro_batches(data, data.meta_info["prompts"], "rollout")) >= 3
    got = learner.compute_log_prob(data).batch
    mask = data.batch["response_mask"].bool()
    torch.testing.assert_close(got["old_log_probs"][mask], want["log_probs"][mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["old_log_probs"][~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(got["entropy"][mask], want["entropy"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["embeddings"], want["embeddings"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["has_gen_emb"], want["has_gen_emb"])


def reshard(learner) -> None:
    if isinstance(learner.policy, FSDPModule):
        learner.policy.reshard()


def learner_gradients(learner) -> dict[str, torch.Tensor]:
    params = learner.policy.named_parameters()
    return {n: full(p.grad).clone() for n, p in params if p.grad is not None}


def test_micro_batching_gives_the_same_gradients(learner, mixed_batch):
    """One update's gradient (clipping off) is the same whether the rows go through as one padded
    micro-batch, one row at a time, or in token-budget micro-batches."""
    _, data = mixed_batch
    data.union(learner.compute_log_prob(data))
    data.union(learner.compute_ref_log_prob(data))
    mask = data.batch["response_mask"].float()
    data.batch["advantages"] = mask * torch.linspace(-1.5, 2.0, len(data)).unsqueeze(1)
    data.meta_info["seed"] = 0
    actor = learner.config.actor
    actor.grad_clip = 1e9
    reshard(learner)  # FSDP2: every parameter a DTensor shard, in snapshot and restore alike
    start = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    grads, losses = [], []
    for rows, dynamic in ((64, False), (1, False), (64, True)):
        actor.micro_batch_size_per_gpu, actor.use_dynamic_bsz = rows, dynamic
        actor.ppo_max_token_len_per_gpu = 120
        reshard(learner)
        with torch.no_grad():
            for n, p in learner.policy.named_parameters():
                p.copy_(start[n])
        losses.append(learner.update_actor(data).meta_info["metrics"]["actor/pg_loss"])
        grads.append(learner_gradients(learner))
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-4, atol=1e-6, msg=name)
