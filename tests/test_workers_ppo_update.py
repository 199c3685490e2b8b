"""The learner's update against plain reference code: PPO clipping (and dual clipping) acts when the
ratio leaves the band, the KL term and its gradient are right when the reference differs from the
policy, and two data-parallel learner ranks give one rank's loss and gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CUDA, PLAIN_CPU, full, scored

from ume_r1.data.collate import media_inputs
from ume_r1.grpo.learner_batch import pad_for_ranks
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.training.micro_batches import pack_rows


@pytest.mark.parametrize(
    "shift, advantage, clipped",
    [
        (1.0, 1.0, True),  # ratio e > 1 + 0.2 with A > 0: the clipped term, a constant
        (1.0, -1.0, False),  # A < 0: max(-A r, -A clip(r)) = -A r, and -A r < 3 |A|: not clipped
        (1.2, -1.0, True),  # ratio e^1.2 > clip_ratio_c = 3 with A < 0: dual clip, a constant
    ],
)
def test_ppo_clipping_acts_outside_the_band(learner, mixed_batch, shift, advantage, clipped):
    _, data = mixed_batch
    scored(learner, data, advantage)
    mask = data.batch["response_mask"].float()
    data.batch["old_log_probs"] = data.batch["old_log_probs"] - shift * mask  # ratio = e^shift
    metrics = learner.update_actor(data).meta_info["metrics"]

    ratio, adv, cfg = torch.tensor(shift).exp(), torch.tensor(advantage), learner.config.actor
    per_token = torch.maximum(
        -adv * ratio, -adv * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    )
    if advantage < 0:
        per_token = torch.minimum(per_token, -adv * cfg.clip_ratio_c)
    assert metrics["actor/pg_loss"] == pytest.approx(float(per_token), rel=1e-5)
    if clipped:  # a constant loss (and an identical reference): no gradient at all
        assert metrics["actor/grad_norm"] < 1e-6
    else:
        assert metrics["actor/grad_norm"] > 1e-3


def test_kl_loss_and_its_gradient_match_the_formula(learner, tiny_model_dir, mixed_batch):
    processor, data = mixed_batch
    scored(learner, data, 0.0)  # no policy-gradient term: the update's gradient is the KL's alone
    mask = data.batch["response_mask"].float()
    offsets = torch.linspace(-0.6, 0.4, mask.numel()).reshape(mask.shape)
    data.batch["ref_log_prob"] = data.batch["ref_log_prob"] + offsets * mask
    metrics = learner.update_actor(data).meta_info["metrics"]
    params = learner.policy.named_parameters()
    got = {n: full(p.grad) for n, p in params if p.grad is not None}

    # Reference: the plain model, and low_var_kl written out (Schulman's k3 estimator).
    model, _ = load_model(tiny_model_dir)
    model.model.visual.requires_grad_(False)
    policy = EmbeddingPolicy(model, processor.gen_emb_id).train()
    batch, prompts = pack_rows(data, data.meta_info["prompts"], processor.pad_id)
    out = policy(**batch, **media_inputs(prompts), with_entropy=False)
    log_ratio = data.batch["ref_log_prob"] - out["log_probs"]
    k3 = log_ratio.exp() - log_ratio - 1
    kl_loss = (k3 * mask).sum() / mask.sum()
    (learner.config.actor.kl_loss_coef * kl_loss).backward()
    assert metrics["actor/kl_loss"] == pytest.approx(kl_loss.item(), rel=1e-4)
    assert kl_loss.item() > 0.01
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == {"model." + n for n in want}
    for name, grad in want.items():
        torch.testing.assert_close(got["model." + name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _rank_update(rank: int, port: int, model_dir: str, data, out_file: str) -> None:
    """One of two learner ranks: update on its half of the rows, write the gathered gradient."""
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    from conftest import make_learner  # pytest put tests/ on sys.path, and spawn passes it on

    learner = make_learner(model_dir, ["actor.grad_clip=1e9"])
    metrics = learner.update_actor(data.chunk(2)[rank]).meta_info["metrics"]
    params = learner.policy.named_parameters()
    grads = {n: full(p.grad) for n, p in params if p.grad is not None}
    if rank == 0:
        torch.save({"grads": grads}, out_file)
    torch.save({"metrics": metrics}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


# two FSDP2 ranks against one: the plain module on CPU (FSDP2 on one rank is the other tests')
@pytest.mark.parametrize("learner", [PLAIN_CPU, CUDA], indirect=True)
def test_two_learner_ranks_equal_one(learner, tiny_model_dir, mixed_batch, tmp_path):
    """Same rows, same weights: two data-parallel ranks log the same losses and apply the same
    gradient as one (global token-mean, micro-batches and padding rows notwithstanding)."""
    _, data = mixed_batch
    scored(learner, data, torch.linspace(-1.0, 1.5, len(data)))
    data.batch["ref_log_prob"] = data.batch["ref_log_prob"] - 0.3 * data.batch["response_mask"]
    padded = pad_for_ranks(data, 2)  # 7 rows: one padding row
    assert len(padded) == 8
    one = learner.update_actor(data).meta_info["metrics"]
    params = learner.policy.named_parameters()
    want = {n: full(p.grad) for n, p in params if p.grad is not None}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_rank_update, args=(port, tiny_model_dir, padded, out), nprocs=2, join=True)
    got = torch.load(out)["grads"]
    per_rank = [torch.load(f"{out}.{r}")["metrics"] for r in range(2)]
    for key in ("actor/pg_loss", "actor/kl_loss"):  # the controller averages the ranks' values
        assert sum(m[key] for m in per_rank) / 2 == pytest.approx(one[key], rel=1e-5, abs=1e-7)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.gpu
def test_offloaded_bf16_reference_equals_the_actor_at_start(tiny_model_dir, mixed_batch, single_rank):
    """`ref.fsdp_config.param_offload`: the reference's shards live in host memory, in bf16; at start
    it scores responses as the actor does (both compute in bf16)."""
    from conftest import make_learner

    learner = make_learner(tiny_model_dir, ["trainer.device=cuda", "ref.fsdp_config.param_offload=true"])
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in learner.ref.parameters())
    _, data = mixed_batch
    mask = data.batch["response_mask"].bool()
    actor = learner.compute_log_prob(data).batch["old_log_probs"]
    ref = learner.compute_ref_log_prob(data).batch["ref_log_prob"]
    torch.testing.assert_close(ref[mask], actor[mask], rtol=0, atol=2e-2)
