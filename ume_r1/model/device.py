"""Where a model runs and how: device and dtype from config (`auto` picks CUDA when present; nothing
is hard-coded), and activation recomputation."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
    }[dtype]


def enable_gradient_checkpointing(model: torch.nn.Module, setting: bool | None, device: torch.device) -> bool:
    """Recompute each decoder / vision block's activations in backward instead of keeping them (HF's
    per-layer checkpointing, non-reentrant so it composes with FSDP2). `setting` None: on with CUDA,
    off on CPU (where memory is rarely the limit and the recompute is pure cost). Returns whether on."""
    on = device.type == "cuda" if setting is None else bool(setting)
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return on
