"""Qwen2-VL on megatron-core: the HF vision tower feeding a megatron GPTModel language model.

The language model is a GPTModel built from the local (non Transformer Engine) layer spec, so it needs
neither TE nor apex. The forward mirrors `Qwen2VLModel.forward`: word embeddings, image/video
embeddings scattered in at the pad tokens, 3-D M-RoPE positions from HF's `get_rope_index`, decoder,
final norm, output layer. megatron-core 0.16's GPT forward (and the M-RoPE module's constructor) is
CUDA-only, so on a CPU box only construction with plain RoPE and weight movement can be exercised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from torch import nn

from sft.megatron.convert import _get, attention_shape, hf_to_mcore, mcore_to_hf
from ume_r1.data.collate import mm_token_type_ids


def rope_settings(text_config: Any) -> tuple[float, list[int] | None]:
    """(rotary base, mrope section) from `rope_parameters` (transformers >= 5) or `rope_scaling` (older)."""
    params = _get(text_config, "rope_parameters") or _get(text_config, "rope_scaling") or {}
    base = params.get("rope_theta", _get(text_config, "rope_theta", 10000.0))
    section = params.get("mrope_section")
    return float(base), list(section) if section else None


def transformer_config(
    text_config: Any, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides: Any
) -> TransformerConfig:
    """A TransformerConfig equal to a Qwen2 text config. Fusions are off: they need TE or apex."""
    heads, groups, head_dim = attention_shape(text_config)
    _, section = rope_settings(text_config)
    kwargs: dict[str, Any] = dict(
        num_layers=_get(text_config, "num_hidden_layers"),
        hidden_size=_get(text_config, "hidden_size"),
        ffn_hidden_size=_get(text_config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        add_qkv_bias=True,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=_get(text_config, "rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        mrope_section=section,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    text_config: Any,
    tied: bool,
    config: TransformerConfig | None = None,
    mrope: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """The language model as a GPTModel. `mrope=False` builds plain RoPE instead: megatron's M-RoPE
    constructor calls torch.cuda.current_device(); rotary has no weights, so the state dict is the same."""
    config = config or transformer_config(text_config)
    base, section = rope_settings(text_config)
    use_mrope = mrope and section is not None
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=_get(text_config, "vocab_size"),
        max_sequence_length=_get(text_config, "max_position_embeddings"),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="mrope" if use_mrope else "rope",
        rotary_base=base,
        parallel_output=True,
    )


def attention_bias_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean mask [b, 1, s, s], True = masked: causal and no padded keys. Given a mask,
    the local attention uses it instead of its own causal one, so left-padded (generation-layout)
    batches work. Pad query rows see no key; megatron fills -10000, not -inf, so they stay finite."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return ~allowed


class MegatronQwen2VL(nn.Module):
    """`model` is the HF Qwen2VLModel with its language model removed (it keeps the vision tower and
    `get_rope_index`), so this module's state dict holds the vision tower under its HF names
    (`model.visual.*`) and the language model as `gpt.*`."""

    def __init__(self, hf_model: nn.Module, gpt: GPTModel) -> None:
        super().__init__()
        inner = hf_model.model
        inner.language_model = None  # replaced by `gpt`; dropping it frees its memory
        self.model = inner
        self.gpt = gpt
        self.hf_config = hf_model.config
        self.text_config = hf_model.config.text_config
        self.tied = bool(hf_model.config.tie_word_embeddings)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: TransformerConfig | None = None) -> MegatronQwen2VL:
        """Build the GPTModel, load the converted language-model weights into it (strictly; this rank's
        tensor-parallel shard when TP > 1) and wrap it with the HF vision tower."""
        from sft.megatron.convert import tp_split

        text = hf_model.config.text_config
        tied = bool(hf_model.config.tie_word_embeddings)
        full = hf_to_mcore(hf_model.state_dict(), text, tied)
        lm = {k: v for k, v in full.items() if k.startswith(("embedding.", "decoder.", "output_layer."))}
        config = config or transformer_config(text)
        gpt = build_gpt_model(text, tied, config, mrope=torch.cuda.is_available())
        if config.tensor_model_parallel_size > 1:
            lm = tp_split(lm, config.tensor_model_parallel_size)[
                parallel_state.get_tensor_model_parallel_rank()
            ]
        missing, unexpected = gpt.load_state_dict(lm, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(
                f"weights do not fit the GPTModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        gpt.to(next(hf_model.parameters()).device)
        return cls(hf_model, gpt)

    def input_embeddings(self, input_ids: torch.Tensor, **media: torch.Tensor) -> torch.Tensor:
        """Word embeddings [s, b, h] with image/video embeddings placed at their pad tokens."""
        emb = self.gpt.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)  # [b, s, h]
        cfg = self.hf_config
        for pixels, grid, token in (
            ("pixel_values", "image_grid_thw", cfg.image_token_id),
            ("pixel_values_videos", "video_grid_thw", cfg.video_token_id),
        ):
            if media.get(pixels) is None:
                continue
            getter = (
                self.model.get_image_features
                if token == cfg.image_token_id
                else self.model.get_video_features
            )
            feats = torch.cat(getter(media[pixels], media[grid]).pooler_output).to(emb.dtype)
            mask = (input_ids == token).unsqueeze(-1).expand_as(emb)
            if mask.sum() != feats.numel():
                raise ValueError(
                    f"{int((input_ids == token).sum())} pad tokens but {feats.shape[0]} features"
                )
            emb = emb.masked_scatter(mask, feats)
        return emb.transpose(0, 1).contiguous()

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **media: torch.Tensor):
        """3-D M-RoPE positions [3, b, s], exactly as the HF model computes them."""
        cfg = self.hf_config
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids(input_ids, cfg.image_token_id, cfg.video_token_id),
            image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"),
            attention_mask=attention_mask,
        )
        return positions

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **media: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [b, s, h] after the last norm, logits [b, s, v / tp]); any padding."""
        decoder_input = self.input_embeddings(input_ids, **media)
        positions = self.position_ids(input_ids, attention_mask, **media)
        gpt = self.gpt
        if gpt.position_embedding_type == "mrope":
            rotary = gpt.rotary_pos_emb(positions, gpt.mrope_section)
        else:  # CPU-built plain RoPE: only the text (temporal) axis
            rotary = gpt.rotary_pos_emb(input_ids.shape[1])
        hidden = gpt.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_bias_mask(attention_mask),
            rotary_pos_emb=rotary,
        )
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(hidden, weight=weight)
        return hidden.transpose(0, 1), logits.transpose(0, 1)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model in HF names (TP=1 only; gather shards with convert.tp_merge first otherwise)."""
        out = {k: v for k, v in self.state_dict().items() if not k.startswith("gpt.")}
        gpt = {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}
        out.update(mcore_to_hf(gpt, self.text_config, self.tied))
        return out
