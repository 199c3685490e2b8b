"""Learner worker: the FSDP2 policy (GRPO actor) and the frozen reference, in one Ray worker group.

One forward of the policy gives the old log-probs and the generative embeddings; `update_actor`
applies PPO-clip + KL(low_var_kl) to the reference with verl's core_algos, averaged over the global
mini-batch so the loss does not depend on the number of ranks or micro-batches.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from verl import DataProto
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty

from ume_r1.data.collate import shared_media
from ume_r1.data.processor import EncodedPrompt
from ume_r1.data.template import GEN_EMB
from ume_r1.model.device import enable_gradient_checkpointing, resolve_device, resolve_dtype
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.rollout.weights import SyncStats, buckets
from ume_r1.training.checkpoint import load_sharded, save_sharded
from ume_r1.training.fsdp import (
    adamw,
    clip_and_step,
    full_state_dict,
    init_distributed,
    iter_full_parameters,
    place,
    save_hf_checkpoint,
)
from ume_r1.training.memory import StagePeaks
from ume_r1.training.micro_batches import pack_rows, pad_columns, plan_micro_batches, row_lengths
from workers.base import ConfiguredWorker

LOSS_SHARES = ("actor/pg_loss", "actor/kl_loss")


def resolved_prompts(data: DataProto) -> list[EncodedPrompt]:
    """The step's prompts of a learner batch (`ume_r1.grpo.learner_batch`): fetched from the object
    store when the driver shared them by reference (once per node, then from its shared memory)."""
    prompts = data.meta_info["prompts"]
    return ray.get(prompts) if isinstance(prompts, ray.ObjectRef) else prompts


def _asking(data: DataProto, **forwards) -> DataProto:
    """`data` (its rows shared, not copied) asking `compute_forwards` for these forwards."""
    return DataProto(data.batch, data.non_tensor_batch, {**data.meta_info, **forwards})


class LearnerWorker(ConfiguredWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, model_path: str) -> None:
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.peaks = StagePeaks(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes exactly this worker's GPU
        init_distributed(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        param_dtype = resolve_dtype(cfg.dtype, self.device)
        self.model_path = model_path

        # Only rank 0 reads the checkpoint; the others get their shards from it. Master weights stay
        # fp32; FSDP casts to param_dtype for compute. One fp32 rank holds plain modules (`place`).
        rank0 = dist.get_rank() == 0
        model, self.tokenizer = load_model(model_path, "cpu", torch.float32, weights=rank0)
        enable_gradient_checkpointing(model, cfg.actor.gradient_checkpointing, self.device)
        if cfg.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        self.gen_emb_id = self.tokenizer.convert_tokens_to_ids(GEN_EMB)
        policy = EmbeddingPolicy(model, self.gen_emb_id)
        self.policy = place(policy, mesh, param_dtype, self.device, cfg.actor.strategy)
        optim = cfg.actor.optim
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = adamw(trainable, optim.lr, optim.betas, optim.weight_decay)
        warmup = max(1, int(optim.lr_warmup_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )

        self.ref = None
        if cfg.actor.use_kl_loss:  # frozen: stored in the compute dtype (bf16 on GPU), no fp32 master
            ref_model, _ = load_model(model_path, "cpu", param_dtype, weights=rank0)
            ref_model.requires_grad_(False)
            offload = bool(cfg.ref.fsdp_config.param_offload) and self.device.type == "cuda"
            ref = EmbeddingPolicy(ref_model, self.gen_emb_id)
            self.ref = place(ref, mesh, param_dtype, self.device, cfg.ref.strategy, offload).eval()

    def _forward(
        self, module, data: DataProto, prompts, with_entropy: bool, with_log_probs: bool = True
    ) -> dict[str, torch.Tensor]:
        """One micro-batch, packed to its own longest prompt and response; per-token outputs come
        back at the batch's response width, zero on padding."""
        width = data.batch["response_mask"].shape[1]
        batch, rows = pack_rows(data, prompts, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        shared = shared_media(rows).to(self.device)
        out = module(
            **batch,
            shared=shared,
            temperature=self.config.rollout.temperature,
            with_entropy=with_entropy,
            with_log_probs=with_log_probs,
        )
        for key in ("log_probs", "entropy"):  # the policy zeroes padding; this widens to the batch's width
            if key in out:
                out[key] = pad_columns(out[key], width)
        return out

    def _micro_batching(self, forward: str) -> tuple[int, int | None]:
        """(rows per micro-batch, token budget or None) of the "actor" update or the "rollout" / "ref"
        log-prob forward, under verl's names."""
        if forward == "actor":
            cfg = self.config.actor
            return (
                cfg.micro_batch_size_per_gpu,
                cfg.ppo_max_token_len_per_gpu if cfg.use_dynamic_bsz else None,
            )
        cfg = self.config[forward]
        budget = cfg.log_prob_max_token_len_per_gpu if cfg.log_prob_use_dynamic_bsz else None
        return cfg.log_prob_micro_batch_size_per_gpu, budget

    def _micro_batches(self, data: DataProto, prompts, forward: str) -> list[np.ndarray]:
        """Row indices of each micro-batch. Every rank gets the same number of micro-batches, as FSDP's
        collectives need."""
        rows, budget = self._micro_batching(forward)
        lengths = row_lengths(data, prompts)
        local = plan_micro_batches(*lengths, rows_per_micro=rows, max_tokens=budget)
        if self.world_size > 1:
            count = torch.tensor([len(local)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            if int(count) > len(local):
                local = plan_micro_batches(
                    *lengths, rows_per_micro=rows, max_tokens=budget, min_count=int(count)
                )
        return [np.asarray(g) for g in local]

    @staticmethod
    def _rows(data: DataProto, rows: np.ndarray) -> DataProto:
        """The micro-batch of these rows (the batch itself when it is all of them, in order)."""
        return (
            data
            if len(rows) == len(data) and (rows == np.arange(len(data))).all()
            else data.select_idxs(rows)
        )

    def _forward_all(
        self, module, data: DataProto, forward: str, with_entropy: bool, with_log_probs: bool = True
    ) -> dict[str, torch.Tensor]:
        """Forward over every row in micro-batches; outputs in the rows' original order, on CPU."""
        parts, order = [], []
        prompts = resolved_prompts(data)
        for rows in self._micro_batches(data, prompts, forward):
            micro = self._rows(data, rows)
            parts.append(self._forward(module, micro, prompts, with_entropy, with_log_probs))
            order.append(torch.as_tensor(rows))
        inverse = torch.argsort(torch.cat(order))
        return {k: torch.cat([p[k] for p in parts])[inverse].cpu() for k in parts[0]}

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    @torch.no_grad()
    def compute_forwards(self, data: DataProto) -> DataProto:
        """The step's forwards before the update, in one call. `meta_info["policy"]`: "log_probs" (old
        log-probs, entropy and generative embeddings, one forward), "embeddings" (those alone, without
        the vocabulary projection) or None; `meta_info["ref"]`: the reference's log-probs too. Its peak
        memory is recorded as `meta_info["stage"]` ("forward" unless said)."""
        with self.peaks.stage(data.meta_info.get("stage", "forward")):
            return self._compute_forwards(data)

    def _compute_forwards(self, data: DataProto) -> DataProto:
        tensors = {}
        policy = data.meta_info.get("policy")
        if policy is not None:
            self.policy.eval()
            with_log_probs = policy == "log_probs"
            out = self._forward_all(self.policy, data, "rollout", with_log_probs, with_log_probs)
            tensors.update(embeddings=out["embeddings"], has_gen_emb=out["has_gen_emb"])
            if with_log_probs:
                tensors.update(old_log_probs=out["log_probs"], entropy=out["entropy"])
        if data.meta_info.get("ref"):
            tensors["ref_log_prob"] = self._forward_all(self.ref, data, "ref", with_entropy=False)[
                "log_probs"
            ]
        return DataProto.from_dict(tensors=tensors)

    def compute_log_prob(self, data: DataProto) -> DataProto:
        """Old log-probs, entropy and generative embeddings of the responses, in one forward."""
        return self.compute_forwards(_asking(data, policy="log_probs", ref=False))

    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        return self.compute_forwards(_asking(data, policy=None, ref=True))

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _mini_batch_rows(self, rows: int) -> int:
        """This rank's rows per optimizer step: `actor.ppo_mini_batch_size` counts responses over all
        ranks (verl's meaning), so the number of optimizer steps per batch does not depend on how many
        learner ranks there are. null: the whole step batch, one optimizer step."""
        size = self.config.actor.ppo_mini_batch_size
        if size is None:
            return rows
        if size % self.world_size:
            raise ValueError(
                f"actor.ppo_mini_batch_size={size} must be a multiple of "
                f"learner.num_workers={self.world_size}"
            )
        return max(1, size // self.world_size)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def update_actor(self, data: DataProto) -> DataProto:
        """The update (`_update`); its metrics carry this rank's peak memory of each stage since the last
        update (`perf/peak_memory_gb/*`: generate, forward, probe, update)."""
        with self.peaks.stage("update"):
            result = self._update(data)
        result.meta_info["metrics"].update(self.peaks.take())
        return result

    def _update(self, data: DataProto) -> DataProto:
        """PPO epochs over mini-batches; gradients accumulate over micro-batches. The logged losses are
        the true means over each mini-batch: every micro-batch's loss is its share of the global mean
        (verl's `global_batch_info`), so the shares are summed here and averaged over ranks by the
        controller. Without `old_log_probs` in `data` (an on-policy step: one epoch, one mini-batch) the
        update's own forward, detached, is the old log-prob, and the result carries it and its entropy
        (the weights before the step), as `compute_log_prob` would have."""
        cfg = self.config.actor
        self.policy.train()
        policy_loss = get_policy_loss_fn(cfg.policy_loss)
        mini_size = self._mini_batch_rows(len(data))
        on_policy = "old_log_probs" not in data.batch
        if on_policy and (cfg.ppo_epochs != 1 or mini_size < len(data)):
            raise ValueError(
                "a batch without old_log_probs needs an on-policy update: actor.ppo_epochs=1 and one "
                "mini-batch (actor.ppo_mini_batch_size null or >= the batch); got "
                f"ppo_epochs={cfg.ppo_epochs}, {mini_size} of {len(data)} rows per mini-batch"
            )
        before = {k: torch.zeros(data.batch["response_mask"].shape) for k in ("old_log_probs", "entropy")}
        prompts = resolved_prompts(data)
        metrics: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(int(data.meta_info.get("seed", 0)))
        skipped = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(data), generator=generator) if cfg.shuffle else torch.arange(len(data))
            shuffled = data.select_idxs(order.numpy())
            for start, mini in zip(range(0, len(data), mini_size), shuffled.split(mini_size), strict=True):
                loss_config = OmegaConf.create(
                    {
                        "clip_ratio": cfg.clip_ratio,
                        "clip_ratio_low": cfg.clip_ratio_low,
                        "clip_ratio_high": cfg.clip_ratio_high,
                        "clip_ratio_c": cfg.clip_ratio_c,
                        "global_batch_info": {
                            "dp_size": self.world_size,
                            "batch_num_tokens": self._global_sum(float(mini.batch["response_mask"].sum())),
                            # rows with response tokens: padding rows (zero mask) are no sequences
                            "global_batch_size": self._global_sum(
                                float((mini.batch["response_mask"].sum(1) > 0).sum())
                            ),
                        },
                    }
                )
                self.optimizer.zero_grad(set_to_none=True)
                steps = []
                for rows in self._micro_batches(mini, prompts, "actor"):
                    step, outputs = self._micro_step(
                        self._rows(mini, rows), prompts, policy_loss, loss_config
                    )
                    steps.append(step)
                    for key, value in outputs.items():  # on-policy: the rows' values before the step
                        before[key][order[start + rows]] = value.cpu()
                for key in steps[0]:
                    values = [step[key] for step in steps]
                    total = key in LOSS_SHARES  # shares of the mini-batch mean: their sum is the mean
                    metrics.setdefault(key, []).append(float(np.sum(values) if total else np.mean(values)))
                grad_norm, stepped = clip_and_step(self.policy.parameters(), self.optimizer, cfg.grad_clip)
                metrics.setdefault("actor/grad_norm", []).append(grad_norm)
                skipped += not stepped
                self.scheduler.step()
        summary = {k: float(np.mean(v)) for k, v in metrics.items()}
        summary["actor/lr"] = self.scheduler.get_last_lr()[0]
        summary["actor/skipped_steps"] = float(skipped)  # optimizer steps left out: non-finite gradient
        steps_taken = cfg.ppo_epochs * -(-len(data) // mini_size) - skipped
        meta = {"metrics": summary, "weights_changed": steps_taken > 0}
        return DataProto.from_dict(tensors=before, meta_info=meta) if on_policy else DataProto(meta_info=meta)

    def _micro_step(
        self, micro: DataProto, prompts, policy_loss, loss_config
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Loss and backward of one micro-batch; its metrics, and on an on-policy step (no
        `old_log_probs`) its log-probs and entropy before the update."""
        cfg = self.config.actor
        on_policy = "old_log_probs" not in micro.batch
        out = self._forward(self.policy, micro, prompts, with_entropy=on_policy)
        mask = micro.batch["response_mask"].to(self.device).float()
        log_prob = out["log_probs"]
        old = log_prob.detach() if on_policy else micro.batch["old_log_probs"].to(self.device)
        pg_loss, pg_metrics = policy_loss(
            old_log_prob=old,
            log_prob=log_prob,
            advantages=micro.batch["advantages"].to(self.device),
            response_mask=mask,
            loss_agg_mode=cfg.loss_agg_mode,
            config=loss_config,
        )
        loss = pg_loss
        metrics = {**pg_metrics, "actor/pg_loss": float(pg_loss.detach())}
        if self.ref is not None:
            kl = kl_penalty(log_prob, micro.batch["ref_log_prob"].to(self.device), cfg.kl_loss_type)
            kl_loss = agg_loss(kl, mask, cfg.loss_agg_mode, **loss_config.global_batch_info)
            loss = loss + cfg.kl_loss_coef * kl_loss
            metrics["actor/kl_loss"] = float(kl_loss.detach())
        loss.backward()
        return metrics, ({"old_log_probs": old, "entropy": out["entropy"]} if on_policy else {})

    def rollout_weight_buckets(self, trainable_only: bool = True):
        """The actor's weights for rollout engines: full tensors in the engine's compute dtype (bf16 on
        GPU), in layer-aligned buckets of at most `rollout.weight_bucket_mb`. By default trainable
        parameters only: every engine loaded the same checkpoint, so frozen ones (a frozen vision tower)
        already match. Collective on all ranks."""
        rollout = self.config.rollout
        named = iter_full_parameters(
            self.policy, resolve_dtype(rollout.dtype, self.device), trainable_only=trainable_only
        )
        return buckets(named, int(rollout.weight_bucket_mb * 2**20))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def publish_weights(self) -> dict:
        """Standalone layout: rank 0 puts each bucket into Ray's object store (moved to CPU) and returns
        the references; rollout workers fetch them, so no weight passes through the driver."""
        stats, refs, start = SyncStats(), [], time.perf_counter()
        for bucket in self.rollout_weight_buckets():
            if self.rank == 0:
                refs.append(ray.put([(name, t.cpu()) for name, t in bucket]))
                stats.add(bucket)
        stats.seconds = time.perf_counter() - start
        return {"refs": refs, "metrics": stats.metrics()}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.policy)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, out_dir: str) -> str:
        """The actor as an HF checkpoint (rank 0 writes it)."""
        return save_hf_checkpoint(self.policy, self.tokenizer, self.model_path, out_dir)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_state(self, path: str) -> dict:
        """The actor's training state: every rank writes its model and optimizer shards under `path`;
        returns the LR scheduler's state (the same on every rank) for the controller's record. The
        reference is never saved: it stays the original model."""
        save_sharded(Path(path), self.policy, self.optimizer)
        return self.scheduler.state_dict()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_state(self, path: str, scheduler: dict) -> None:
        load_sharded(Path(path), self.policy, self.optimizer)
        self.scheduler.load_state_dict(scheduler)
