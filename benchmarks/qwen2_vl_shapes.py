"""The published Qwen2-VL-2B and -7B shapes (their config.json), for benchmarks that build random or
meta-device models of the real size."""

from __future__ import annotations

QWEN2_VL = {
    "2B": dict(
        text_config=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        tie_word_embeddings=True,
    ),
    "7B": dict(
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        tie_word_embeddings=False,
    ),
}


def cut_2b(layers: int):
    """A random Qwen2-VL-2B-shaped model (hidden 1536, vocabulary 151,936, tied embeddings) cut to
    `layers` decoder layers and a one-block vision tower, fp32; and its vocabulary size."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    shape = QWEN2_VL["2B"]
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
