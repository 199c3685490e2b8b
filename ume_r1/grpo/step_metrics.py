"""Per-step diagnostics (logged, never optimised): how much signal the rewards give GRPO, and how the
generative embeddings of the batch retrieve."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from verl import DataProto
from verl.trainer.ppo.core_algos import kl_penalty

from ume_r1.eval.metrics import within_group_cosine
from ume_r1.grpo.advantages import flat_groups
from ume_r1.grpo.grouping import StepPrompts


def prompt_means(embeddings: torch.Tensor, prompt_index: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """One normalised embedding per prompt: the mean of its responses' embeddings."""
    sums = torch.zeros(num_prompts, embeddings.shape[1]).index_add_(0, prompt_index, embeddings)
    return F.normalize(sums, dim=-1)


def in_batch_hit_at_1(embeddings: torch.Tensor, prompt_index: torch.Tensor, plan: StepPrompts) -> float:
    """Share of query responses whose most similar target prompt (in the batch) is their positive."""
    targets = [i for i, r in enumerate(plan.roles) if r == "target"]
    centres = prompt_means(embeddings, prompt_index, len(plan.roles))[targets]
    hits, total = 0, 0
    for q, pos in zip(plan.query_of_example, plan.positive_of_example, strict=True):
        mine = embeddings[prompt_index == q]
        best = (mine @ centres.T).argmax(dim=1)
        hits += int((best == targets.index(pos)).sum())
        total += len(mine)
    return hits / max(total, 1)


def _group_variance(values: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Per prompt: the population variance of its responses' values (what GRPO's advantages see)."""
    num = int(prompt_index.max()) + 1 if len(prompt_index) else 0
    count = torch.bincount(prompt_index, minlength=num).double()
    mean = torch.zeros(num, dtype=torch.float64).index_add_(0, prompt_index, values.double()) / count.clamp(
        min=1
    )
    sq = torch.zeros(num, dtype=torch.float64).index_add_(
        0, prompt_index, (values.double() - mean[prompt_index]) ** 2
    )
    return (sq / count.clamp(min=1))[count > 0]


def reward_group_stats(scores: dict[str, torch.Tensor], prompt_index: torch.Tensor) -> dict[str, float]:
    """How much signal the step's rewards give GRPO: the mean within-group std of the reward, the share
    of groups whose G rewards are all equal (no gradient), and the weighted format term's share of the
    within-group variances of the format and embedding terms (the rest is the embedding term's)."""
    variance = _group_variance(scores["reward"], prompt_index)
    out = {
        "reward/group_std": float(variance.sqrt().mean()),
        "reward/zero_variance_groups": float(flat_groups(scores["reward"], prompt_index).double().mean()),
    }
    if "embedding" in scores:  # the format part is what the reward adds to it: format_weight * format
        fmt = float(_group_variance(scores["reward"] - scores["embedding"], prompt_index).mean())
        emb = float(_group_variance(scores["embedding"], prompt_index).mean())
        out["reward/format_variance_share"] = fmt / (fmt + emb) if fmt + emb > 0 else 0.0
    return out


def prompt_tokens(plan: StepPrompts, prompt_index: torch.Tensor) -> float:
    """Prompt tokens of every row (each response is scored after its prompt)."""
    lengths = torch.tensor([len(p.input_ids) for p in plan.prompts], dtype=torch.float64)
    return float(lengths[prompt_index].sum())


def rollout_probs_diff(
    engine_logprobs: list[list[list[float]]], old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """verl's `training/rollout_probs_diff_*`: |p_engine - p_learner| of every sampled token, the rollout
    engine's probability against the learner's old one (same tokens, same temperature). Near zero when
    the engine holds the actor's weights; a stale or half-applied weight sync shows here first."""
    engine = torch.zeros_like(old_log_probs, dtype=torch.float32)
    for i, row in enumerate(row for group in engine_logprobs for row in group):
        engine[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    mask = response_mask.bool()
    diff = (engine.exp() - old_log_probs.float().exp()).abs()[mask]
    if not diff.numel():
        return {}
    return {
        "training/rollout_probs_diff_max": float(diff.max()),
        "training/rollout_probs_diff_mean": float(diff.mean()),
    }


def step_metrics(
    plan: StepPrompts,
    data: DataProto,
    prompt_index: torch.Tensor,
    scores: dict[str, torch.Tensor],
    update_metrics: dict[str, float],
    timing: dict[str, float],
    kl_loss_type: str | None,
) -> dict[str, float]:
    """One step's metrics: the reward terms, `update_metrics`, the generative embeddings' in-batch
    retrieval and spread, response length, entropy, throughput, the KL to the reference (with
    `kl_loss_type`, when the KL loss is on) and the seconds of each stage."""
    mask = data.batch["response_mask"].float()
    masked_mean = lambda x: float((x * mask).sum() / mask.sum().clamp(min=1))  # noqa: E731
    emb = data.batch["embeddings"].float()
    metrics = {f"reward/{k}": float(v.mean()) for k, v in scores.items()}
    metrics.update(update_metrics)
    generated = float(mask.sum())
    metrics.update(
        {
            "embedding/in_batch_hit@1": in_batch_hit_at_1(emb, prompt_index, plan),
            "embedding/within_group_cosine": within_group_cosine(emb, prompt_index),
            "embedding/has_gen_emb": float(data.batch["has_gen_emb"].float().mean()),
            "response/length_mean": float(mask.sum(1).mean()),
            "actor/entropy": masked_mean(data.batch["entropy"]),
            "rollout/tokens_per_s": generated / max(timing["generate"], 1e-9),
            "perf/tokens_per_s": (prompt_tokens(plan, prompt_index) + generated) / timing["step"],
        }
    )
    if kl_loss_type is not None:
        kl = kl_penalty(data.batch["old_log_probs"], data.batch["ref_log_prob"], kl_loss_type)
        metrics["actor/kl_to_ref"] = masked_mean(kl)
    metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
    return metrics


def within_group_correlation(x: torch.Tensor, y: torch.Tensor, prompt_index: torch.Tensor) -> float:
    """Pearson correlation of x and y after subtracting each prompt's mean from both, over rows where x
    is not NaN: whether, among one prompt's G responses (what GRPO compares), higher x goes with higher y.
    NaN without variation."""
    keep = ~torch.isnan(x)
    x, y, group = x[keep].double(), y[keep].double(), prompt_index[keep]
    if len(x) < 2:
        return float("nan")
    num = int(group.max()) + 1
    count = torch.bincount(group, minlength=num).double().clamp(min=1)
    centred = [v - (torch.zeros(num, dtype=v.dtype).index_add_(0, group, v) / count)[group] for v in (x, y)]
    scale = float(centred[0].norm() * centred[1].norm())
    return float((centred[0] * centred[1]).sum()) / scale if scale > 0 else float("nan")


def reasoning_metrics(
    dependence: torch.Tensor, scores: dict[str, torch.Tensor], prompt_index: torch.Tensor
) -> dict[str, float]:
    """The probe's figures: the mean cosine between own and swapped-reasoning embeddings (1: the
    reasoning does not matter), and the within-group correlation of each response's reasoning dependence
    with its reward and with the reward's components: negative means GRPO's comparison among a
    prompt's responses favours embeddings that ignore the reasoning."""
    metrics = {"embedding/reasoning_sensitivity": float(1 - dependence.nanmean())}
    for key in ("reward", "format", "embedding"):
        if key in scores:
            value = within_group_correlation(dependence, scores[key].float(), prompt_index)
            metrics[f"embedding/reasoning_dependence_corr/{key}"] = value
    return metrics
