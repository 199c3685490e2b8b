"""Cold-start SFT on megatron-core (TP x DP; PP=1): the losses of sft/losses.py, exported as an HF checkpoint.

Run under torchrun (recipes/ume_sft_megatron.sh). Config: configs/sft.yaml plus key=value overrides;
`megatron.tensor_model_parallel_size` / `megatron.pipeline_model_parallel_size` pick the layout and the
data-parallel size is world / TP. In-batch negatives are gathered over the data-parallel group only
(tensor-parallel ranks of one data-parallel rank hold the same rows). Each rank runs its whole share of
the global batch in one forward: GradCache chunking (`train.chunk_tokens`) is the torch backend's.

Training-state checkpoints and resume follow the torch backend (`train.save_freq`, `max_ckpt_to_keep`,
`save_hf_model`, `resume_mode`, `resume_from_path`; layout in ume_r1/training/checkpoint.py), except that
the model and optimizer go to `global_step_N/megatron` in megatron-core's format, which loads under
another TP size.
The HF export of the end of training is `<output_dir>/hf`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from omegaconf import DictConfig, OmegaConf

from sft.losses import cross_mode_nce, info_nce, token_nll
from sft.megatron.checkpoint import load_megatron_state, save_megatron_state
from sft.megatron.convert import tp_merge
from sft.megatron.model import MegatronQwen2VL, transformer_config
from sft.step import EncodedPairs, pair_batches, sft_processor
from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.collate import media_inputs, pack_sequences
from ume_r1.data.sft_rows import load_sft_pairs
from ume_r1.data.template import DISC_EMB, GEN_EMB
from ume_r1.model.device import resolve_dtype
from ume_r1.model.hf_checkpoint import load_model, write_hf_checkpoint
from ume_r1.model.policy import disc_embeddings, gen_emb_positions, hidden_at
from ume_r1.training.checkpoint import CheckpointDir, restore_all_ranks, resume_checkpoint, save_all_ranks

DEFAULTS = {"megatron": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}}
# global_step_N/megatron: model and optimizer in megatron-core's format (sft/megatron/checkpoint.py)
SHARDS = "megatron"


def load_config(overrides: list[str]) -> DictConfig:
    """configs/sft.yaml (if present) under built-in defaults, then key=value overrides."""
    path = Path(__file__).resolve().parents[2] / "configs" / "sft.yaml"
    base = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    base.pop("defaults", None), base.pop("hydra", None)  # Hydra-only keys
    return OmegaConf.merge(OmegaConf.create(DEFAULTS), base, OmegaConf.from_dotlist(overrides))


def forward_pairs(
    model: MegatronQwen2VL, pairs, ids: dict[str, int], pad_id: int, device
) -> dict[str, torch.Tensor]:
    """Response log-probs, mask, and the disc / gen embeddings of 2B sequences (queries then positives)."""
    batch = pack_sequences(pairs.prompts, pairs.responses, pad_id)
    batch = {k: v.to(device) for k, v in {**batch, **media_inputs(pairs.prompts)}.items()}
    media = {
        k: batch[k] for k in batch if k not in ("input_ids", "attention_mask", "responses", "response_mask")
    }
    hidden, logits = model(batch["input_ids"], batch["attention_mask"], **media)
    width = batch["responses"].shape[1]
    # token t of the response is predicted at t - 1; vocab-parallel CE works on TP-sharded logits
    log_probs = -vocab_parallel_cross_entropy(
        logits[:, -width - 1 : -1].float().contiguous(), batch["responses"]
    )
    gen_index, _ = gen_emb_positions(batch["responses"], batch["response_mask"], ids[GEN_EMB])
    return {
        "log_probs": log_probs,
        "mask": batch["response_mask"].float(),
        "gen": hidden_at(hidden[:, -width:], gen_index),
        "disc": disc_embeddings(hidden[:, :-width], batch["input_ids"][:, :-width], ids[DISC_EMB]),
    }


def allreduce_grads(params: list[torch.nn.Parameter], clip: float) -> float:
    """Average gradients over data-parallel ranks (each rank's loss is its rows' mean, so the average is
    the global mean), then clip by the global norm: TP-sharded tensors summed over the TP group."""
    dp = ps.get_data_parallel_group()
    sharded, replicated = torch.zeros(()), torch.zeros(())
    for p in params:
        if p.grad is None:
            continue
        dist.all_reduce(p.grad, group=dp)
        p.grad /= dist.get_world_size(dp)
        sq = p.grad.float().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    device = params[0].device
    sharded = sharded.to(device)
    dist.all_reduce(sharded, group=ps.get_tensor_model_parallel_group())
    norm = float((sharded + replicated.to(device)).sqrt())
    if clip and norm > clip:
        for p in params:
            if p.grad is not None:
                p.grad *= clip / (norm + 1e-6)
    return norm


def export_hf(model: MegatronQwen2VL, source: str, tokenizer, out_dir: str) -> None:
    """Gather TP shards, write an HF directory to a temporary name, then rename (rank 0 writes)."""
    from sft.megatron.convert import mcore_to_hf

    lm = {k: v for k, v in model.gpt.state_dict().items() if not k.endswith("_extra_state")}
    tp_group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) > 1:
        shards = [None] * dist.get_world_size(tp_group)
        dist.all_gather_object(shards, {k: v.cpu() for k, v in lm.items()}, group=tp_group)
        lm = tp_merge(shards)
    if dist.get_rank() == 0:
        state = {k: v.cpu() for k, v in model.state_dict().items() if not k.startswith("gpt.")}
        state.update(mcore_to_hf({k: v.cpu() for k, v in lm.items()}, model.text_config, model.tied))
        write_hf_checkpoint(state, model.hf_config, tokenizer, source, out_dir)
    dist.barrier()


def train(cfg: DictConfig) -> dict[str, Any]:
    tp, pp = cfg.megatron.tensor_model_parallel_size, cfg.megatron.pipeline_model_parallel_size
    if pp != 1:
        raise ValueError(
            "megatron SFT supports pipeline_model_parallel_size=1 only: the contrastive loss needs the "
            "last stage's hidden states of every sequence at once; use TP and DP"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    ps.initialize_model_parallel(tp, pp)
    rank = dist.get_rank()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_dtype(cfg.train.get("dtype", "auto"), device)
    seed = cfg.train.get("seed", 1)
    torch.manual_seed(seed)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)

    hf, tokenizer = load_model(cfg.model.path, dtype=dtype)
    model = MegatronQwen2VL.from_hf(hf, transformer_config(hf.config.text_config, tp, pp, dtype)).to(device)
    if cfg.train.get("freeze_vision_tower", True):
        model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    steps, lr = cfg.train.total_steps, cfg.train.lr
    optim = torch.optim.AdamW(
        params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay
    )
    warmup = max(1, int(cfg.train.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )

    processor = sft_processor(tokenizer, cfg.model.path, cfg.data)
    pairs, _ = load_sft_pairs(cfg.data.train_files, cfg.data.image_root, cfg.data.on_bad_row)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    gbs = cfg.train.global_batch_size
    if gbs % dp or len(pairs) < gbs:
        raise ValueError(f"global_batch_size={gbs} must divide by DP={dp} and not exceed {len(pairs)} pairs")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (DISC_EMB, GEN_EMB)}
    order = BatchOrder(len(pairs), gbs, cfg.data.seed, cfg.data.shuffle)  # the same on every rank
    out_dir, tc = Path(cfg.output_dir), cfg.train
    checkpoints = CheckpointDir(out_dir, tc.get("max_ckpt_to_keep", None))
    resume = resume_checkpoint(tc.get("resume_mode", "auto"), out_dir, tc.get("resume_from_path", None))
    first = 1
    if resume is not None:
        read = lambda path: load_megatron_state(path / SHARDS, model, optim)  # noqa: E731
        first = restore_all_ranks(resume, read, sched, order)["step"] + 1
    if rank == 0:
        checkpoints.discard_partial()

    def write(staging: Path) -> None:
        save_megatron_state(staging / SHARDS, model, optim)
        if tc.get("save_hf_model", False):
            export_hf(model, cfg.model.path, tokenizer, str(staging / "hf"))

    def save(step: int) -> None:
        state = {
            "data": order.state_dict(),
            "scheduler": sched.state_dict(),
            "model_path": str(cfg.model.path),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        save_all_ranks(checkpoints, step, write, state)

    metrics, save_freq = {}, tc.get("save_freq", -1)
    batches = pair_batches(pairs, processor, cfg.data, order, steps - first + 1, dp_rank, dp)
    model.train()
    for step in range(first, steps + 1):
        started = time.perf_counter()
        batch = next(batches)
        if batch.indices != next(order)[dp_rank::dp]:
            raise RuntimeError(f"step {step}: the data loader is out of step with the batch order")
        enc = EncodedPairs.concat(batch.rows)
        out = forward_pairs(model, enc, ids, tokenizer.pad_token_id, device)
        b, temp = enc.num_pairs, cfg.train.temperature
        tokens = torch.tensor([float(enc.assistant_tokens())], device=device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())  # the step's token mean, over DP
        ce = token_nll(out["log_probs"], out["mask"], float(tokens) / dp)
        disc = info_nce(out["disc"][:b], out["disc"][b:], temp, group=ps.get_data_parallel_group())
        gen = info_nce(out["gen"][:b], out["gen"][b:], temp, group=ps.get_data_parallel_group())
        loss = disc + gen + ce
        if cfg.train.cross_mode_weight:
            d, g, dp_group = out["disc"], out["gen"], ps.get_data_parallel_group()
            loss = loss + cfg.train.cross_mode_weight * cross_mode_nce(
                d[:b], g[:b], d[b:], g[b:], temp, dp_group
            )
        loss.backward()
        norm = allreduce_grads(params, cfg.train.grad_clip)
        optim.step(), sched.step(), optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seq_tokens = sum(len(p.input_ids) for p in enc.prompts) + enc.assistant_tokens()
        metrics = {
            "step": step,
            "tokens_per_s": seq_tokens * dp / (time.perf_counter() - started),  # prompt + response, all DP
            "disc_nce": float(disc.detach()),
            "gen_nce": float(gen.detach()),
            "ce": float(ce.detach()),
            "grad_norm": norm,
        }
        if rank == 0 and ((step - 1) % cfg.train.log_freq == 0 or step == steps):
            print(metrics, flush=True)
        if save_freq > 0 and (step % save_freq == 0 or step == steps):
            save(step)
    export_hf(model, cfg.model.path, tokenizer, str(out_dir / "hf"))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    train(load_config(sys.argv[1:]))
