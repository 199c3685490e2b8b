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
