"""The tiny Qwen2-VL that tests, the CPU demo and the ablation run on: the real architecture with
random weights, a tokenizer trained here on a small built-in corpus, no hub download.

    python -m ume_r1.model.tiny --out artifacts/tiny-qwen2-vl
"""

from __future__ import annotations

import os

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ume_r1.data.template import (
    CHAT_TOKENS,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    INSTRUCTION,
    SYSTEM_PROMPT,
    UME_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from ume_r1.model.hf_checkpoint import add_ume_tokens, save_checkpoint_dir

# Words the synthetic tasks and templated reasoning use, so the tiny tokenizer learns useful merges.
_TINY_CORPUS_WORDS = (
    "red green blue yellow purple orange black white circle square triangle star shape colour color "
    "image picture photo shown object what which is the a an of in on with and this that it its "
    "question answer describe describes description represent summary think reasoning input query "
    "target small large left right top bottom center background plain noisy video frame text "
    "The image shows a label says names the question asks for its colour word grey caption shape"
)


def _train_tiny_tokenizer(vocab_size: int, extra_text: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        INSTRUCTION,
        SYSTEM_PROMPT,
        _TINY_CORPUS_WORDS,
        "<think> </think> <answer> </answer>",
        *extra_text,
    ]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, padding_side="left"
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    vision_embed_dim: int = 32,
    vision_depth: int = 1,
    image_size: int = 56,
    extra_text: list[str] | None = None,
    ume_tokens: bool = True,
    tie_word_embeddings: bool = False,
    table_rows: int | None = None,
) -> str:
    """Build a randomly initialised Qwen2-VL of the real architecture, small enough for a CPU, with its
    tokenizer and image processor, saved as an ordinary HF directory (written to a temporary name, then
    renamed). `ume_tokens=False` leaves the UME tokens out, as a downloaded checkpoint does (the table
    keeps their two rows spare). `tie_word_embeddings`: one table for input and output, as Qwen2-VL-2B;
    `table_rows`: a table that long, its rows past the tokenizer spare (Qwen2-VL-2B has 277). Returns
    the directory."""
    if hidden_size > 128:
        raise ValueError(f"tiny model hidden_size must be <= 128, got {hidden_size}")
    if hidden_size // num_heads < 32:
        # vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... only.
        raise ValueError(
            f"tiny model head size must be >= 32 (vLLM's CPU attention), got {hidden_size // num_heads}"
        )
    torch.manual_seed(seed)
    tokenizer = _train_tiny_tokenizer(vocab_size, extra_text or [])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config=dict(
            # exact room for the UME tokens: spare rows would be sampled by a random model
            vocab_size=len(tokenizer) + sum(t not in tokenizer.get_vocab() for t in UME_TOKENS),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=dict(
            depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size, num_heads=2, mlp_ratio=2
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Qwen2VLForConditionalGeneration(config)
    if ume_tokens:
        add_ume_tokens(model, tokenizer)
    if table_rows:
        model.resize_token_embeddings(max(table_rows, len(tokenizer)), mean_resizing=False)
    model.generation_config.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]
    pixels = image_size * image_size
    return save_checkpoint_dir(
        out_dir, model, tokenizer, Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny Qwen2-VL used by tests and the CPU demo.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(build_tiny_model(args.out, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers))


if __name__ == "__main__":
    main()
