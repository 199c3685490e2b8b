"""HF checkpoints in and out: load a Qwen2-VL checkpoint from a local directory (adding the UME tokens
it lacks), and write full weights back as an HF directory (safetensors).

Nothing here touches a model hub: paths must be local directories.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ume_r1.data.processor import check_local_dir, load_image_processor, load_tokenizer
from ume_r1.data.template import UME_TOKENS


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> tuple[Qwen2VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local directory; UME tokens are added if the checkpoint lacks them.
    `weights=False`: the same model on the meta device, for data-parallel ranks that receive their
    shards from rank 0 (ume_r1.training.fsdp.shard_from_rank0) instead of each reading the full checkpoint."""
    local = check_local_dir(path)
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


def write_hf_checkpoint(
    state: dict[str, torch.Tensor], hf_config: Qwen2VLConfig, tokenizer, source_path: str, out_dir: str
) -> str:
    """An HF directory from full weights under HF names: safetensors, tokenizer, and the source
    checkpoint's image processor and generation config (`save_checkpoint_dir`). A tied model's table
    may be named once (`embed_tokens`); `lm_head` is then that same tensor."""
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(hf_config)
    if hf_config.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.language_model.embed_tokens.weight"]}
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()  # assigned tensors are new parameters: tie them again (a no-op when untied)
    if (Path(source_path) / "generation_config.json").is_file():
        model.generation_config = model.generation_config.from_pretrained(source_path)
    return save_checkpoint_dir(out_dir, model, tokenizer, load_image_processor(source_path))


def save_checkpoint_dir(out_dir: str | os.PathLike, *parts) -> str:
    """Each of `parts` (model, tokenizer, image processor: anything with `save_pretrained`) saved into
    `out_dir` through a temporary name and a rename, so a crash never leaves a half-written checkpoint
    under the final name. Returns the directory."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:
        part.save_pretrained(tmp)
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
