"""Cold-start SFT, torch backend: FSDP2 (gloo on CPU, nccl on GPU), GradCache-chunked contrastive
step, cosine schedule with warmup, HF checkpoint out (the GRPO stage loads it unchanged).

    python -m sft.train profile=sft_tiny                       # one process
    torchrun --nproc_per_node 8 -m sft.train model.path=... data.train_files=...
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from transformers import get_cosine_schedule_with_warmup

from sft.step import EncodedPairs, pair_batches, sft_processor, sft_step
from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.loader import BadRowCounts, gathered
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.sft_rows import SFTPair, load_sft_pairs
from ume_r1.eval.embed import Embedder
from ume_r1.eval.metrics import chance_level, hit_at_1, mean
from ume_r1.model.device import enable_gradient_checkpointing, resolve_device, resolve_dtype
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.training.checkpoint import (
    SHARDS,
    CheckpointDir,
    load_sharded,
    restore_all_ranks,
    resume_checkpoint,
    save_all_ranks,
    save_sharded,
)
from ume_r1.training.fsdp import adamw, clip_and_step, init_distributed, save_hf_checkpoint, shard_from_rank0
from ume_r1.training.metric_logger import keep_metrics
from ume_r1.training.preflight import check_output_dir, checkpoint_bytes


def batch_order(num_pairs: int, global_batch: int, seed: int, shuffle: bool) -> BatchOrder:
    """The order of global batches; each rank takes every world-th pair of one."""
    world = dist.get_world_size()
    if global_batch % world:
        raise ValueError(f"train.global_batch_size={global_batch} is not divisible by {world} ranks")
    if num_pairs < global_batch:
        raise ValueError(f"train.global_batch_size={global_batch} but only {num_pairs} training pairs")
    return BatchOrder(num_pairs, global_batch, seed, shuffle)


def evaluate(embedder: Embedder, pairs: list[SFTPair], processor: UMEProcessor) -> dict[str, float]:
    """Greedy generative + discriminative Hit@1 of held-out queries against the unique positives of
    their task, and the format rate of the generated reasoning."""
    candidates, pools, positive = {}, {}, []
    for pair in pairs:
        key = processor.encode(pair.positive).key()
        index = candidates.setdefault(key, (len(candidates), pair.positive))[0]
        positive.append(index)
        pools.setdefault(pair.task, set()).add(index)
    query_pools = [sorted(pools[p.task]) for p in pairs]
    sides = [side for _, side in sorted(candidates.values(), key=lambda c: c[0])]
    q = embedder.gen([p.query for p in pairs])
    c = embedder.gen(sides)

    def hits(queries, cands) -> float:
        return mean(
            [
                hit_at_1(cands[pool] @ queries[i], [pool.index(pos)])
                for i, (pool, pos) in enumerate(zip(query_pools, positive, strict=True))
            ]
        )

    return {
        "format_rate": (q.format_rate() * len(pairs) + c.format_rate() * len(sides))
        / (len(pairs) + len(sides)),
        "disc_hit@1": hits(q.disc, c.disc),
        "gen_hit@1": hits(q.gen, c.gen),
        "chance_hit@1": mean([chance_level("hit@1", len(pool), 1) for pool in query_pools]),
    }


def train(cfg: DictConfig) -> dict:
    tc = cfg.train
    device = resolve_device(tc.device)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(tc.seed)
    pairs, report = load_sft_pairs(cfg.data.train_files, cfg.data.image_root, cfg.data.on_bad_row)
    if report.skipped and rank == 0:
        print(
            f"data: skipped {report.skipped} of {report.rows} rows (data.on_bad_row=skip): "
            f"{report.reasons[0]}"
        )
    # Only rank 0 reads the checkpoint; shard_from_rank0 gives the other ranks their shards. A stock
    # checkpoint gets the UME tokens here, in its spare rows.
    model, tokenizer = load_model(cfg.model.path, "cpu", torch.float32, weights=rank == 0)
    processor = sft_processor(tokenizer, cfg.model.path, cfg.data)
    enable_gradient_checkpointing(model, tc.gradient_checkpointing, device)
    if tc.freeze_vision_tower:
        model.model.visual.requires_grad_(False)
    mesh = init_device_mesh(device.type, (world,))
    policy = shard_from_rank0(
        EmbeddingPolicy(model, processor.gen_emb_id, processor.disc_emb_id),
        mesh,
        resolve_dtype(tc.dtype, device),
        device,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(params, tc.lr, tc.betas, tc.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(tc.warmup_ratio * tc.total_steps), tc.total_steps
    )

    out_dir = check_output_dir(cfg.output_dir, checkpoint_bytes(cfg.model.path), "output_dir")
    order = batch_order(len(pairs), tc.global_batch_size, cfg.data.seed, cfg.data.shuffle)
    checkpoints = CheckpointDir(out_dir, tc.max_ckpt_to_keep)
    resume = resume_checkpoint(tc.resume_mode, out_dir, tc.resume_from_path)
    first, skipped, bad_rows = 1, 0, BadRowCounts()
    if resume is not None:
        state = restore_all_ranks(
            resume, lambda path: load_sharded(path / SHARDS, policy, optimizer), scheduler, order
        )
        first, skipped, bad_rows = (
            state["step"] + 1,
            state["skipped_steps"],
            BadRowCounts(**state.get("bad_rows", {})),
        )
    batches = pair_batches(pairs, processor, cfg.data, order, tc.total_steps - first + 1, rank, world)
    log = None
    if rank == 0:
        checkpoints.discard_partial()
        keep_metrics(out_dir / "metrics.jsonl", first - 1)
        log = (out_dir / "metrics.jsonl").open("a")

    def write(staging: Path) -> None:
        save_sharded(staging / SHARDS, policy, optimizer)
        if tc.save_hf_model:
            save_hf_checkpoint(policy, tokenizer, cfg.model.path, str(staging / "hf"))

    def save(step: int) -> None:
        if log is not None:
            log.flush()
        state = {
            "data": order.state_dict(),
            "scheduler": scheduler.state_dict(),
            "skipped_steps": skipped,
            "bad_rows": asdict(bad_rows),
            "model_path": str(cfg.model.path),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        save_all_ranks(checkpoints, step, write, state)

    start = time.perf_counter()
    policy.train()
    for step in range(first, tc.total_steps + 1):
        waited = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waited
        if batch.indices != next(order)[rank::world]:
            raise RuntimeError(f"step {step}: the data loader is out of step with the batch order")
        counts = bad_rows.add(gathered(batch), print if rank == 0 else lambda _: None)
        encoded = EncodedPairs.concat(batch.rows)
        optimizer.zero_grad(set_to_none=True)
        parts = sft_step(
            policy, encoded, processor.pad_id, device, tc.temperature, tc.chunk_tokens, tc.cross_mode_weight
        )
        grad_norm, stepped = clip_and_step(params, optimizer, tc.grad_clip)
        skipped += not stepped
        scheduler.step()
        if log is not None:
            row = {
                "step": step,
                **parts,
                "grad_norm": grad_norm,
                "skipped_steps": skipped,  # optimizer steps left out so far: non-finite gradient norm
                "lr": scheduler.get_last_lr()[0],
                **counts,
                "timing_s/data_wait": waited,  # > 0 only when the data workers fall behind
                "elapsed_s": time.perf_counter() - start,
            }
            log.write(json.dumps(row) + "\n")
            if step % tc.log_freq == 0 or step == tc.total_steps:
                print(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
        if tc.save_freq > 0 and (step % tc.save_freq == 0 or step == tc.total_steps):
            save(step)
    final = str((out_dir / "final").resolve())
    save_hf_checkpoint(policy, tokenizer, cfg.model.path, final)
    summary = {"final": final, "train_seconds": time.perf_counter() - start}
    if cfg.data.test_files and rank == 0:
        summary.update(evaluate_checkpoint(final, cfg))
    if log is not None:
        log.close()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    return summary


def evaluate_checkpoint(path: str, cfg: DictConfig) -> dict[str, float]:
    """Reloads the saved checkpoint (what the GRPO stage will see) and evaluates it."""
    device = resolve_device(cfg.train.device)
    model, tokenizer = load_model(path, device, resolve_dtype(cfg.train.dtype, device))
    processor = sft_processor(tokenizer, path, cfg.data)
    pairs, _ = load_sft_pairs(cfg.data.test_files, cfg.data.image_root, cfg.data.on_bad_row)
    embedder = Embedder(model, processor, device, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    return evaluate(embedder, pairs[: cfg.eval.max_queries], processor)


@hydra.main(config_path="../configs", config_name="sft", version_base=None)
def main(cfg: DictConfig) -> None:
    if cfg.backend != "torch":
        raise ValueError(
            f"backend={cfg.backend!r}: this entry point is the torch backend; "
            "for megatron use recipes/ume_sft_megatron.sh"
        )
    train(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
