"""HF Qwen2-VL <-> megatron-core GPTModel weights (the language model only; the vision tower stays HF).

mbridge has no `qwen2_vl` bridge, so this is a small explicit mapping. The text part of Qwen2-VL is
Qwen2: q/k/v projections with bias, grouped-query attention, RMSNorm, SwiGLU. Megatron names follow
the local (non Transformer Engine) layer spec, `get_gpt_layer_local_spec(normalization="RMSNorm")`:

    embedding.word_embeddings.weight               <- model.language_model.embed_tokens.weight
    decoder.layers.i.input_layernorm.weight        <- ...layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.*   <- q_proj/k_proj/v_proj (weight and bias), fused
    decoder.layers.i.self_attention.linear_proj.weight <- o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight      <- post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight         <- [gate_proj; up_proj]
    decoder.layers.i.mlp.linear_fc2.weight         <- down_proj.weight
    decoder.final_layernorm.weight                 <- model.language_model.norm.weight
    output_layer.weight                            <- lm_head.weight (untied models only)

A tied model (Qwen2-VL-2B: `tie_word_embeddings`) has one table: its HF state dict still lists
`lm_head.weight` (the same tensor as `embed_tokens`), but the GPTModel shares its embedding instead of
holding an output layer, and the export names the one table once.

Fused QKV uses megatron's per-query-group interleaving: for group g, rows are [the q heads of g, k_g,
v_g], so a column-parallel split along dim 0 hands each tensor-parallel rank whole groups.
Every other key (the vision tower) passes through unchanged under its HF name.
"""

from __future__ import annotations

from typing import Any

import torch

# transformers >= 5 nests the text model under model.language_model; checkpoints written by older
# versions (and the Qwen2-VL releases on disk) use model.* directly.
HF_PREFIXES = ("model.language_model.", "model.")
LAYER_MAP = {  # per-layer tensors that map one to one
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def attention_shape(text_config: Any) -> tuple[int, int, int]:
    """(query heads, key/value groups, head dim) of a Qwen2 text config."""
    heads = _get(text_config, "num_attention_heads")
    groups = _get(text_config, "num_key_value_heads") or heads
    head_dim = _get(text_config, "head_dim") or _get(text_config, "hidden_size") // heads
    return heads, groups, head_dim


def _hf_prefix(hf_sd: dict[str, torch.Tensor]) -> str:
    for prefix in HF_PREFIXES:
        if f"{prefix}embed_tokens.weight" in hf_sd:
            return prefix
    raise KeyError("no embed_tokens.weight under model.language_model. or model.: not a Qwen2-VL state dict")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_config: Any) -> torch.Tensor:
    """Interleave q/k/v (weights (out, in) or biases (out,)) into megatron's per-group layout."""
    heads, groups, head_dim = attention_shape(text_config)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, text_config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv; works on a tensor-parallel shard too if given that shard's config share."""
    heads, groups, head_dim = attention_shape(text_config)
    q_rows = heads // groups * head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def hf_to_mcore(hf_sd: dict[str, torch.Tensor], text_config: Any, tied: bool) -> dict[str, torch.Tensor]:
    """Megatron GPTModel state dict of the language model, plus every non-language tensor unchanged;
    `tied`: the model's `tie_word_embeddings` (then no output layer)."""
    prefix = _hf_prefix(hf_sd)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return hf_sd[key]

    out = {"embedding.word_embeddings.weight": take(f"{prefix}embed_tokens.weight")}
    for i in range(_get(text_config, "num_hidden_layers")):
        hf, mc = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        for mc_key, hf_key in LAYER_MAP.items():
            out[mc + mc_key] = take(hf + hf_key)
        for kind in ("weight", "bias"):
            qkv = [take(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{mc}self_attention.linear_qkv.{kind}"] = fuse_qkv(*qkv, text_config)
        gate, up = take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out["decoder.final_layernorm.weight"] = take(f"{prefix}norm.weight")
    if tied:
        if "lm_head.weight" in hf_sd and not torch.equal(
            take("lm_head.weight"), out["embedding.word_embeddings.weight"]
        ):
            raise ValueError("tie_word_embeddings is set but lm_head.weight differs from embed_tokens.weight")
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    leftover = [k for k in hf_sd if k not in used]
    stray = [k for k in leftover if k.startswith(f"{prefix}layers.") or k.startswith(f"{prefix}norm")]
    if stray:  # a language tensor this mapping does not know would otherwise be silently dropped
        raise KeyError(f"unmapped language-model tensors: {stray[:5]}")
    out.update({k: hf_sd[k] for k in leftover})
    return out


def mcore_to_hf(
    mcore_sd: dict[str, torch.Tensor], text_config: Any, tied: bool, prefix: str = HF_PREFIXES[0]
) -> dict[str, torch.Tensor]:
    """Inverse of hf_to_mcore (names as transformers >= 5 holds them in memory, unless `prefix`); a tied
    model's table appears once, as `embed_tokens` (transformers and vLLM tie `lm_head` to it on load)."""
    sd = {k: v for k, v in mcore_sd.items() if not k.endswith("_extra_state")}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    out = {f"{prefix}embed_tokens.weight": take("embedding.word_embeddings.weight")}
    for i in range(_get(text_config, "num_hidden_layers")):
        hf, mc = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        for mc_key, hf_key in LAYER_MAP.items():
            out[hf + hf_key] = take(mc + mc_key)
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(take(f"{mc}self_attention.linear_qkv.{kind}"), text_config)
            out.update({f"{hf}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)})
        gate, up = take(mc + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
    out[f"{prefix}norm.weight"] = take("decoder.final_layernorm.weight")
    if not tied:
        out["lm_head.weight"] = take("output_layer.weight")
    stray = [k for k in sd if k not in used and (k.startswith("decoder.") or k.startswith("embedding."))]
    if stray:
        raise KeyError(f"unmapped megatron tensors: {stray[:5]}")
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


# ---- tensor parallelism: split a full megatron state dict into TP shards and merge them back ----
# Column-parallel (dim 0): embedding, output layer, linear_qkv (weight and bias), linear_fc1 (gate and up
# split separately, each shard holds [gate_r; up_r]). Row-parallel (dim 1): linear_proj, linear_fc2.
# Norms are replicated. Vision tensors are replicated (the HF tower is not tensor-parallel).
_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def tp_split(sd: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """Shard r of a full megatron state dict for tensor-parallel size `tp` (vocab must divide by tp)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in sd.items():
        if key.endswith("linear_fc1.weight"):
            parts = [torch.cat(pair) for pair in zip(*(h.chunk(tp) for h in t.chunk(2)), strict=True)]
        elif key.endswith(_COLUMN):
            parts = list(t.chunk(tp, dim=0))
        elif key.endswith(_ROW):
            parts = list(t.chunk(tp, dim=1))
        else:
            parts = [t] * tp
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.contiguous()
    return shards


def tp_merge(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of tp_split."""
    out = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith("linear_fc1.weight"):
            halves = [p.chunk(2) for p in parts]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif key.endswith(_COLUMN):
            out[key] = torch.cat(parts, dim=0)
        elif key.endswith(_ROW):
            out[key] = torch.cat(parts, dim=1)
        else:
            out[key] = first
    return out
