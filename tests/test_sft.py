"""SFT losses against their formulas, GradCache against the full-batch step, two gloo ranks against
one process, and a stock checkpoint (no UME tokens) going into SFT as it is."""

from __future__ import annotations

import math
import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import full, run_sft
from torch.distributed.device_mesh import init_device_mesh

from sft.losses import cross_mode_nce, info_nce, token_nll
from sft.step import encode_pairs, gradcache_chunks, sft_step
from ume_r1.data.processor import UMEProcessor, load_tokenizer
from ume_r1.data.sft_rows import load_sft_pairs
from ume_r1.data.template import UME_TOKENS
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.model.tiny import build_tiny_model
from ume_r1.synthetic.shapes_sft import make_synthetic_sft
from ume_r1.training.fsdp import shard


def reference_info_nce(q: list[list[float]], t: list[list[float]], tau: float) -> float:
    """Eq. 1 written out, averaged with its target -> query mirror."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def one_side(a, b):
        total = 0.0
        for i in range(len(a)):
            logits = [dot(a[i], b[j]) / tau for j in range(len(b))]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        return total / len(a)

    return (one_side(q, t) + one_side(t, q)) / 2


def test_info_nce_matches_formula():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    got = info_nce(q, t, temperature=0.5)
    assert math.isclose(float(got), reference_info_nce(q.tolist(), t.tolist(), 0.5), rel_tol=1e-9)
    one_way = info_nce(q, t, temperature=0.5, symmetric=False)
    expected = (
        sum(
            -math.log(
                math.exp(float(q[i] @ t[i]) / 0.5) / sum(math.exp(float(q[i] @ t[j]) / 0.5) for j in range(5))
            )
            for i in range(5)
        )
        / 5
    )
    assert math.isclose(float(one_way), expected, rel_tol=1e-9)


def test_token_nll_is_masked_sum_over_count():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = float(token_nll(log_probs, mask, num_tokens=5))
    assert math.isclose(got, (1 + 2 + 0.5 + 0.25 + 9) / 5, rel_tol=1e-6)


@pytest.fixture(scope="module")
def sft_pairs(tmp_path_factory):
    paths = make_synthetic_sft(str(tmp_path_factory.mktemp("sft")), seed=0, n_train=16, n_test=4)
    return load_sft_pairs(paths["train"])[0]


def grads_of(policy) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in policy.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = full(g).detach().clone()
    return out


def test_cross_mode_nce_matches_formula():
    torch.manual_seed(1)
    qd, qg, td, tg = (F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1) for _ in range(4))
    got = float(cross_mode_nce(qd, qg, td, tg, temperature=0.1))
    expected = (
        reference_info_nce(qg.tolist(), td.tolist(), 0.1) + reference_info_nce(qd.tolist(), tg.tolist(), 0.1)
    ) / 2
    assert math.isclose(got, expected, rel_tol=1e-9)


@pytest.mark.parametrize("cross_mode_weight", [0.0, 0.5])
def test_gradcache_equals_full_batch(tiny_model_dir, sft_pairs, cross_mode_weight):
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    policy = EmbeddingPolicy(model, processor.gen_emb_id, processor.disc_emb_id)
    pairs = encode_pairs(sft_pairs[:6], processor)
    cpu = torch.device("cpu")
    step = partial(sft_step, policy, pairs, processor.pad_id, cpu, 0.05, cross_mode_weight=cross_mode_weight)
    full = step(chunk_tokens=None)
    full_grads = grads_of(policy)
    policy.zero_grad()
    chunked = step(chunk_tokens=800)
    chunks = gradcache_chunks(pairs, 800, cpu)
    assert len(chunks) > 2 and sorted(i for c in chunks for i in c) == list(range(12))
    for chunk in chunks:  # within the budget, or one sequence alone
        longest = max(len(pairs.prompts[i].input_ids) for i in chunk) + max(
            len(pairs.responses[i]) for i in chunk
        )
        assert len(chunk) == 1 or len(chunk) * longest <= 800
    chunked_grads = grads_of(policy)
    keys = ("disc_nce", "gen_nce", "ce", "loss") + (("cross_nce",) if cross_mode_weight else ())
    assert ("cross_nce" in full) == bool(cross_mode_weight)
    for key in keys:
        assert math.isclose(full[key], chunked[key], rel_tol=1e-5), key
    parts = full["disc_nce"] + full["gen_nce"] + full["ce"] + cross_mode_weight * full.get("cross_nce", 0.0)
    assert math.isclose(full["loss"], parts, rel_tol=1e-9)
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name, grad in full_grads.items():
        # fp32 summation order differs between the two paths: tolerate noise at 1e-6 of the largest entry
        atol = 1e-6 * max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


def _rank_step(rank: int, world: int, port: int, model_dir: str, pairs, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    processor = UMEProcessor.from_pretrained(model_dir)
    model, _ = load_model(model_dir)
    policy = shard(
        EmbeddingPolicy(model, processor.gen_emb_id, processor.disc_emb_id),
        init_device_mesh("cpu", (world,)),
        torch.float32,
    )
    parts = sft_step(
        policy,
        encode_pairs(pairs[rank::world], processor),
        processor.pad_id,
        torch.device("cpu"),
        temperature=0.05,
        chunk_tokens=600,
    )
    losses = torch.tensor([parts["disc_nce"], parts["gen_nce"], parts["ce"]], dtype=torch.float64)
    dist.all_reduce(losses)
    grads = grads_of(policy)
    if rank == 0:
        torch.save({"losses": losses / world, "grads": grads}, out_path)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tiny_model_dir, sft_pairs, tmp_path):
    pairs = sft_pairs[:8]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "ranks.pt")
    mp.spawn(_rank_step, args=(2, port, tiny_model_dir, pairs, out_path), nprocs=2, join=True)
    ranks = torch.load(out_path)

    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    policy = EmbeddingPolicy(model, processor.gen_emb_id, processor.disc_emb_id)
    single = sft_step(
        policy,
        encode_pairs(pairs, processor),
        processor.pad_id,
        torch.device("cpu"),
        temperature=0.05,
        chunk_tokens=None,
    )
    expected = torch.tensor([single["disc_nce"], single["gen_nce"], single["ce"]], dtype=torch.float64)
    torch.testing.assert_close(ranks["losses"], expected, rtol=1e-5, atol=1e-6)
    reference = {f"model.{k}" if not k.startswith("model.") else k: v for k, v in grads_of(policy).items()}
    assert ranks["grads"].keys() == reference.keys()
    for name, grad in reference.items():
        atol = 1e-6 * max(1.0, float(grad.abs().max()))  # fp32 noise: chunks sum in another order
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=atol, msg=name)


def test_sft_starts_from_a_stock_checkpoint(sft_dir, tmp_path):
    """A checkpoint as downloaded (no UME tokens) goes into SFT with no separate step: the tokens are
    added in its spare rows on the way in, and the output is a UME checkpoint the processor accepts."""
    stock = build_tiny_model(tmp_path / "stock", ume_tokens=False)
    stock_size = len(load_tokenizer(stock))
    with pytest.raises(ValueError, match="<disc_emb>"):
        UMEProcessor.from_pretrained(stock)
    summary = run_sft(stock, sft_dir, tmp_path / "sft")
    tokenizer = UMEProcessor.from_pretrained(summary["final"]).tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in UME_TOKENS] == [stock_size, stock_size + 1]
    assert len(load_model(summary["final"])[0].get_input_embeddings().weight) == stock_size + 2  # spare rows
