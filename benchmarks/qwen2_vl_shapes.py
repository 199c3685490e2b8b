"""A random Qwen2-VL-2B-shaped model in memory (`ume_r1.model.qwen2_vl.SHAPES`), for benchmarks that
measure one update or one checkpoint at the real vocabulary."""

from __future__ import annotations

from ume_r1.model.qwen2_vl import SHAPES


def cut_2b(layers: int):
    """A random Qwen2-VL-2B-shaped model (hidden 1536, vocabulary 151,936, tied embeddings) cut to
    `layers` decoder layers and a one-block vision tower, fp32; and its vocabulary size."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    shape = SHAPES["2B"]
    config = Qwen2VLConfig(
        text_config={
            **shape["text_config"],
            "num_hidden_layers": layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 1536, "num_heads": 2, "mlp_ratio": 2},
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration(config), shape["text_config"]["vocab_size"]
