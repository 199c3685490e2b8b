"""Model factory: load a Qwen2-VL checkpoint from a local directory, or build a tiny one.

Nothing here touches a model hub: paths must be local directories, and the tiny model's
tokenizer is trained here on a small built-in corpus.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ume_r1.template import (
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

# Words the synthetic tasks and templated reasoning use, so the tiny tokenizer learns useful merges.
_TINY_CORPUS_WORDS = (
    "red green blue yellow purple orange black white circle square triangle star shape colour color "
    "image picture photo shown object what which is the a an of in on with and this that it its "
    "question answer describe describes description represent summary think reasoning input query "
    "target small large left right top bottom center background plain noisy video frame text "
    "The image shows a label says names the question asks for its colour word grey caption shape"
)


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


def _check_local_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model path '{path}' is not a local HF checkpoint directory (no config.json); "
            "this system never downloads from a hub: build the tiny model (make tiny-model) "
            "or point model.path at a downloaded checkpoint"
        )
    return p


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_check_local_dir(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> tuple[Qwen2VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local directory; UME tokens are added if the checkpoint lacks them.
    `weights=False`: the same model on the meta device, for data-parallel ranks that receive their
    shards from rank 0 (ume_r1.fsdp.shard_from_rank0) instead of each reading the full checkpoint."""
    local = _check_local_dir(path)
    tokenizer = load_tokenizer(local)
    if weights:
        model = Qwen2VLForConditionalGeneration.from_pretrained(local, dtype=dtype, local_files_only=True)
    else:
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration._from_config(
                Qwen2VLConfig.from_pretrained(local), dtype=dtype
            )
    add_ume_tokens(model, tokenizer)
    return (model.to(device) if weights else model), tokenizer


def load_image_processor(path: str | os.PathLike, max_pixels: int | None = None) -> Qwen2VLImageProcessorPil:
    """The PIL image processor (no torchvision needed); `max_pixels` caps image resolution."""
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    if (Path(path) / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True, **kwargs)
    return Qwen2VLImageProcessorPil(**kwargs)


def write_hf_checkpoint(
    state: dict[str, torch.Tensor], hf_config: Qwen2VLConfig, tokenizer, source_path: str, out_dir: str
) -> str:
    """An HF directory from full weights under HF names: safetensors, tokenizer, and the source
    checkpoint's image processor and generation config. Written to a temporary name and renamed, so
    a crash never leaves a half-written checkpoint under the final name."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(hf_config)
    model.load_state_dict(state, assign=True, strict=True)
    if (Path(source_path) / "generation_config.json").is_file():
        model.generation_config = model.generation_config.from_pretrained(source_path)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    load_image_processor(source_path).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


def add_ume_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add `<disc_emb>` / `<gen_emb>` if missing; new embedding rows are the mean of the rows of the
    tokens that spell the tag as plain text (never random), in both input and output embeddings.

    The table never shrinks: a stock Qwen2-VL table (151,936 rows) has spare rows past its tokenizer
    (151,657 entries), and the new tokens take them. It grows only when the tokenizer outgrows it, and
    then to a multiple of 128, which tensor-parallel vocabulary sharding (Megatron, vLLM) needs."""
    missing = [t for t in UME_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        spellings = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in missing}
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=128, mean_resizing=False)
        tables = [model.get_input_embeddings().weight]
        if not model.config.tie_word_embeddings:
            tables.append(model.get_output_embeddings().weight)
        with torch.no_grad():
            for token, pieces in spellings.items():
                new_id = tokenizer.convert_tokens_to_ids(token)
                for table in tables:
                    table[new_id] = table[pieces].mean(dim=0)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in UME_TOKENS}


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
) -> str:
    """Build a randomly initialised Qwen2-VL of the real architecture, small enough for a CPU, with its
    tokenizer and image processor, saved as an ordinary HF directory (written to a temporary name, then
    renamed). Returns the directory."""
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
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    add_ume_tokens(model, tokenizer)
    model.generation_config.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size
    ).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


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
