"""The GRPO controller (single controller, verl-style): drives rollout, learner and reward worker
groups on Ray through one step of DESIGN section 3 after another.

    python -m ume_r1.grpo.trainer profile=tiny            # or any Hydra override, e.g. rollout.n=8
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from verl import DataProto

from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.loader import BadRowCounts, EncodedRows, row_batches
from ume_r1.data.media import MediaLimits
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.grpo.advantages import drop_flat_groups, grpo_advantages
from ume_r1.grpo.grouping import EncodedExample, StepPrompts, encode_example, plan_prompts
from ume_r1.grpo.learner_batch import build_sequences, on_policy, pad_for_ranks, share_prompts
from ume_r1.grpo.probe import embed_swapped, reasoning_dependence
from ume_r1.grpo.step_metrics import reasoning_metrics, reward_group_stats, rollout_probs_diff, step_metrics
from ume_r1.grpo.supervision import SupervisedGroup, WorkerFailure
from ume_r1.grpo.worker_groups import init_ray, learner_config, node_pool, plain, worker_group
from ume_r1.reward.batch import RewardBatch
from ume_r1.reward.registry import available_rewards
from ume_r1.rollout.engine import Sampled
from ume_r1.training.checkpoint import (
    SHARDS,
    CheckpointDir,
    read_state,
    resume_checkpoint,
    rng_state,
    set_rng_state,
)
from ume_r1.training.memory import PREFIX as PEAK_MEMORY
from ume_r1.training.metric_logger import MetricLogger
from ume_r1.training.preflight import check_output_dir, checkpoint_bytes
from workers.hybrid import ActorRolloutRefWorker
from workers.learner import LearnerWorker
from workers.reward import RewardWorker
from workers.rollout import RolloutWorker, joined_samples


class GRPOTrainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.examples, report = load_examples(
            _as_list(cfg.data.train_files), cfg.data.image_root, cfg.data.on_bad_row
        )
        if report.skipped:
            print(
                f"data: skipped {report.skipped} of {report.rows} rows (data.on_bad_row=skip); first: "
                f"{report.reasons[0]}"
            )
        if len(self.examples) < cfg.data.train_batch_size:
            raise ValueError(
                f"data.train_batch_size={cfg.data.train_batch_size} but only "
                f"{len(self.examples)} usable rows in {cfg.data.train_files}"
            )
        if cfg.reward.path is None and cfg.reward.name not in available_rewards():
            raise ValueError(
                f"reward.name={cfg.reward.name!r} is unknown; available: {sorted(available_rewards())}"
            )
        self.processor = UMEProcessor.from_pretrained(
            cfg.model.path, cfg.data.max_prompt_length, cfg.data.max_pixels, MediaLimits.from_config(cfg.data)
        )
        self.tokenizer = self.processor.tokenizer
        steps_per_epoch = len(self.examples) // cfg.data.train_batch_size
        self.total_steps = cfg.trainer.total_training_steps or steps_per_epoch * cfg.trainer.total_epochs
        self.run_dir = check_output_dir(
            cfg.trainer.default_local_dir, checkpoint_bytes(cfg.model.path), "trainer.default_local_dir"
        )
        self.model_path = str(Path(cfg.model.path).resolve())
        self.order = BatchOrder(
            len(self.examples), cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle
        )
        self.checkpoints = CheckpointDir(self.run_dir, cfg.trainer.max_ckpt_to_keep)
        for leftover in self.checkpoints.discard_partial():
            print(f"checkpoint: removed {leftover} (a write that did not finish)")
        self.resume_from = resume_checkpoint(
            cfg.trainer.resume_mode, self.run_dir, cfg.trainer.resume_from_path
        )
        resumed = read_state(self.resume_from) if self.resume_from else None
        if resumed and resumed["model_path"] != self.model_path:
            raise ValueError(
                f"{self.resume_from} continues a run that started from {resumed['model_path']}, but "
                f"model.path={self.model_path}: the reference (KL anchor) must stay the original model"
            )
        self.bad_rows = BadRowCounts()
        if resumed:
            self.order.load_state_dict(resumed["data"])
            self.bad_rows = BadRowCounts(**resumed.get("bad_rows", {}))
        encode = partial(encode_example, processor=self.processor, truncate=cfg.data.truncation == "truncate")
        # before Ray starts: the data workers fork from this process
        self.batches = row_batches(
            EncodedRows(self.examples, encode, cfg.data.on_bad_row, cfg.data.truncation, cfg.data.seed),
            self.order,
            self.total_steps - (resumed["step"] if resumed else 0),
            cfg.data.dataloader_num_workers,
            cfg.data.prefetch_factor,
        )

        init_ray(cfg)
        self.gpu = cfg.trainer.device == "cuda" or (
            cfg.trainer.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
        self.timeout_s = float(cfg.trainer.worker_timeout_s)
        self.rollout_restarts = 0
        self.threads = cfg.ray.threads_per_worker
        learners = node_pool(cfg.learner.num_workers, cfg.trainer.nnodes, self.gpu, "learner.num_workers")
        self.hybrid = bool(cfg.trainer.hybrid_engine)
        self.on_policy = on_policy(cfg)
        if not self.on_policy:  # the learner's old-log-prob forward gives the embeddings anyway
            cfg.rollout.return_embeddings = False
        # verl's ActorRolloutRef (hybrid): each learner rank generates with its own engine; else
        # standalone rollout workers, scaled independently of the learners
        learner_cls = ActorRolloutRefWorker if self.hybrid else LearnerWorker
        self.learners = worker_group(
            learner_cls, learners, learner_config(cfg), "learner", self.timeout_s, self.threads
        )
        self.learners.init_model(self.model_path)
        self.rollouts = self.learners if self.hybrid else self._rollout_group()
        reward_pool = node_pool(1, 1, False, "reward")
        self.rewarder = worker_group(
            RewardWorker, reward_pool, plain(cfg.reward), "reward", self.timeout_s, 1
        )
        self.rewarder.init_reward()
        self.logger = MetricLogger(
            cfg,
            self.run_dir,
            resumed_step=resumed["step"] if resumed else 0,
            run_id=resumed["wandb_id"] if resumed else None,
        )

    def fit(self) -> Path:
        """Steps from the first one not in the resumed checkpoint to `total_steps`; a training-state
        checkpoint every `trainer.save_freq` steps and at the last; the actor as an HF checkpoint in
        `final/` at the end."""
        first = self.restore(self.resume_from) + 1 if self.resume_from else 1
        save_freq = self.cfg.trainer.save_freq
        steps = range(first, self.total_steps + 1)
        for step in tqdm(steps, desc="grpo", initial=first - 1, total=self.total_steps, dynamic_ncols=True):
            try:
                waited = time.perf_counter()
                batch = next(self.batches)
                waited = time.perf_counter() - waited
                if batch.indices != next(self.order):
                    raise RuntimeError(f"step {step}: the data loader is out of step with the batch order")
                metrics = self.step(batch.rows, step)
                metrics.update(self.bad_rows.add(batch, tqdm.write))
                metrics["timing_s/data_wait"] = waited  # > 0 only when the data workers fall behind
                self.logger.log(metrics, step)
                if save_freq > 0 and (step % save_freq == 0 or step == self.total_steps):
                    self.save(step)
            except WorkerFailure as failure:
                latest = self.checkpoints.latest()
                raise WorkerFailure(
                    f"step {step}: {failure}. Started again with trainer.resume_mode=auto, the run "
                    f"resumes from {latest or 'the start (no checkpoint yet)'}"
                ) from None
        final = (self.run_dir / "final").resolve()
        self.learners.save_checkpoint(str(final))
        self.logger.finish()
        return final

    def _rollout_group(self) -> SupervisedGroup:
        """Standalone rollout workers, each loaded from the original checkpoint."""
        rollout = self.cfg.rollout
        pool = node_pool(rollout.num_workers, rollout.nnodes, self.gpu, "rollout.num_workers")
        group = worker_group(RolloutWorker, pool, plain(rollout), "rollout", self.timeout_s, self.threads)
        group.init_model(self.model_path)
        return group

    def _rollout_call(self, method: str, *args):
        """A call on the rollout workers. Standalone layout: when one dies or falls silent, the group
        is recreated with the actor's current weights and the call repeated, up to
        `trainer.max_worker_restarts` times in a run (the step's results do not change: the same
        prompts and seeds reach the same weights). Hybrid: the engines are the learner ranks, whose
        loss ends the run."""
        while True:
            try:
                return getattr(self.rollouts, method)(*args)
            except WorkerFailure as failure:
                limit = self.cfg.trainer.max_worker_restarts
                if self.hybrid or self.rollout_restarts >= limit:
                    raise
                self.rollout_restarts += 1
                tqdm.write(
                    f"{failure}; recreating the rollout workers "
                    f"({self.rollout_restarts} of trainer.max_worker_restarts={limit})"
                )
                self.rollouts.shutdown()
                self.rollouts = self._rollout_group()
                if method != "load_weights":  # that call brings the current weights itself
                    self.sync_weights()

    def _workers(self) -> dict[str, SupervisedGroup]:
        groups = {"learner": self.learners, "reward": self.rewarder}
        if not self.hybrid:
            groups["rollout"] = self.rollouts
        return groups

    def save(self, step: int) -> Path:
        """The training state after `step` (see ume_r1.training.checkpoint): sharded actor and optimizer, LR
        scheduler, data position, every process's RNG, the resolved config, the reference's source."""
        start = time.perf_counter()
        staging = self.checkpoints.begin(step).resolve()
        scheduler = self.learners.save_state(str(staging / SHARDS))[0]
        if self.cfg.trainer.save_hf_model:
            self.learners.save_checkpoint(str(staging / "hf"))
        rng = {name: group.get_rng_state() for name, group in self._workers().items()}
        path = self.checkpoints.commit(
            step,
            {
                "data": self.order.state_dict(),
                "bad_rows": asdict(self.bad_rows),
                "scheduler": scheduler,
                "rng": {"driver": rng_state(), **rng},
                "model_path": self.model_path,
                "wandb_id": self.logger.run_id,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            },
        )
        tqdm.write(f"checkpoint: {path} ({time.perf_counter() - start:.1f} s)")
        return path

    def restore(self, path: Path) -> int:
        """Load a checkpoint written by `save`; returns its step. The reference is not touched: it was
        loaded from the original model, and the data position was read when the run was set up. The
        engines get the restored weights before the next step."""
        state = read_state(path)
        self.learners.load_state(str((path / SHARDS).resolve()), state["scheduler"])
        set_rng_state(state["rng"]["driver"])
        for name, group in self._workers().items():
            group.set_rng_state(state["rng"][name])
        self.sync_weights()
        tqdm.write(f"resumed from {path} (step {state['step']})")
        return state["step"]

    def step(self, examples: list[EncodedExample], step: int) -> dict[str, float]:
        cfg, timing = self.cfg, {}
        start = time.perf_counter()
        with _timer(timing, "prepare"):
            plan = plan_prompts(examples)
        with _timer(timing, "rollout"):
            sampled, timing["generate"] = self.rollout(plan, seed=cfg.trainer.seed * 100_003 + step)
        with _timer(timing, "forward"):
            data, prompt_index = build_sequences(plan.prompts, sampled.responses)
            shared = share_prompts(data)  # the step's pixels cross the object store once
            data.meta_info["seed"] = step
            self.forward(data, sampled)
        update_metrics = {}
        texts = self.tokenizer.batch_decode([r for group in sampled.responses for r in group])
        dependence = self.reasoning_dependence(plan, sampled.responses, texts, data, step, shared, timing)
        with _timer(timing, "reward"):
            batch = RewardBatch(
                embeddings=data.batch["embeddings"].float(),
                responses=texts,
                prompt_index=prompt_index,
                has_gen_emb=data.batch["has_gen_emb"].bool(),
                roles=plan.roles,
                positives=plan.positives,
                negatives=plan.negatives,
                in_batch_negatives=plan.in_batch_negatives,
            )
            scores = self.rewarder.score(batch)[0]
        reward = scores["reward"]
        if dependence is not None:
            update_metrics.update(reasoning_metrics(dependence, scores, prompt_index))
            if cfg.algorithm.reasoning_bonus_coef:
                reward = reward + cfg.algorithm.reasoning_bonus_coef * dependence.nan_to_num(0.0)
        data.batch["advantages"] = grpo_advantages(
            reward, data.batch["response_mask"], prompt_index, cfg.algorithm.norm_adv_by_std_in_grpo
        )
        update_metrics.update(reward_group_stats(scores, prompt_index))
        kept = data
        if cfg.algorithm.filter_groups.enable:
            kept = drop_flat_groups(data, reward, prompt_index)  # the rewards the advantages came from
            update_metrics["filter/kept_rows"] = len(kept) / len(data)
        if len(kept):
            with _timer(timing, "update"):
                update = self.learners.update_actor(pad_for_ranks(kept, cfg.learner.num_workers))
                per_rank = update.meta_info["metrics"]
                for key, values in per_rank.items():  # per-rank lists; peak memory: the largest rank's
                    update_metrics[key] = float((np.max if key.startswith(PEAK_MEMORY) else np.mean)(values))
            if self.on_policy:  # the update's forward gave the old log-probs (the weights before it)
                data.union(update[: len(data)])
            with _timer(timing, "sync"):
                if self.needs_sync(update.meta_info["weights_changed"]):
                    update_metrics.update(self.sync_weights())
        if "old_log_probs" in data.batch:  # from the forward before the update, or from the update
            update_metrics.update(
                rollout_probs_diff(sampled.logprobs, data.batch["old_log_probs"], data.batch["response_mask"])
            )
        timing["step"] = time.perf_counter() - start
        kl_type = cfg.actor.kl_loss_type if cfg.actor.use_kl_loss else None
        metrics = step_metrics(plan, data, prompt_index, scores, update_metrics, timing, kl_type)
        metrics["fault/rollout_restarts"] = float(self.rollout_restarts)
        return metrics

    def forward(self, data: DataProto, sampled: Sampled) -> None:
        """The learners' forwards before the update, in one call, into `data`: the policy's old log-probs
        (unless the step is on-policy) and embeddings (unless the engine returned them), and the
        reference's log-probs (with the KL loss)."""
        cfg = self.cfg
        if sampled.embeddings is not None:
            data.batch["embeddings"], data.batch["has_gen_emb"] = sampled.embeddings, sampled.has_gen_emb
        policy = None if self.on_policy else "log_probs"
        if policy is None and sampled.embeddings is None:
            policy = "embeddings"
        if policy is None and not cfg.actor.use_kl_loss:
            return
        padded = pad_for_ranks(data, cfg.learner.num_workers)
        padded.meta_info.update(policy=policy, ref=bool(cfg.actor.use_kl_loss))
        data.union(self.learners.compute_forwards(padded)[: len(data)])

    def reasoning_dependence(
        self, plan: StepPrompts, responses, texts: list[str], data: DataProto, step: int, shared, timing
    ) -> torch.Tensor | None:
        """Each response's `reasoning_dependence` (`ume_r1.grpo.probe`), on the probe's steps
        (`trainer.reasoning_sensitivity_freq`) and on every step with `algorithm.reasoning_bonus_coef`;
        None on the others."""
        cfg = self.cfg
        freq = cfg.trainer.reasoning_sensitivity_freq
        if not cfg.algorithm.reasoning_bonus_coef and not (freq > 0 and step % freq == 0):
            return None
        with _timer(timing, "probe"):
            swapped, valid = embed_swapped(
                self.learners, plan, responses, texts, self.tokenizer, shared, step, cfg.learner.num_workers
            )
            return reasoning_dependence(
                data.batch["embeddings"], swapped, valid & data.batch["has_gen_emb"].bool()
            )

    def rollout(self, plan: StepPrompts, seed: int) -> tuple[Sampled, float]:
        """Unique prompts split evenly over the rollout workers; G responses per prompt, in order, with
        the engines' log-probs of their tokens (and embeddings, where the engines give them), and the
        slowest worker's generation seconds."""
        workers = self.rollouts.world_size
        chunks = [list(c) for c in np.array_split(np.arange(len(plan.prompts)), workers)]
        results = self._rollout_call(
            "generate", [[plan.prompts[i] for i in c] for c in chunks], [seed] * workers
        )
        return joined_samples(results)

    def needs_sync(self, weights_changed: bool) -> bool:
        """Whether the engines need the actor's weights after an update: never for the hybrid hf engine
        (it generates with the actor's own module); not for standalone engines when no optimizer step
        was taken (every gradient non-finite)."""
        if self.hybrid:
            return self.cfg.rollout.name != "hf"
        return weights_changed

    def sync_weights(self) -> dict[str, float]:
        """Learner -> rollout engines. Hybrid: in process, on every rank. Standalone: the learner puts
        layer-aligned buckets into the object store (one copy per node) and hands the driver only their
        references, which it forwards to every rollout worker. Returns rank 0's / the publisher's
        `sync/*` figures (bytes, buckets and seconds per engine)."""
        if self.hybrid:
            return self.learners.sync_rollout()[0]
        published = self.learners.publish_weights()[0]
        self._rollout_call("load_weights", published["refs"])
        return published["metrics"]


@contextmanager
def _timer(timing: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timing[name] = time.perf_counter() - start


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


@hydra.main(config_path="../../configs", config_name="grpo", version_base=None)
def main(cfg: DictConfig) -> None:
    final = GRPOTrainer(cfg).fit()
    print(f"final checkpoint: {final}")


if __name__ == "__main__":
    main()
