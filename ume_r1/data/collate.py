"""Pack prompts and responses into padded tensors: left-padded prompts for generation, and
prompt+response sequences (prompt left-padded, response right-padded, verl's layout) for the learner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ume_r1.data.processor import EncodedPrompt

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def mm_token_type_ids(input_ids: torch.Tensor, image_pad_id: int, video_pad_id: int) -> torch.Tensor:
    """Per-token modality (text 0, image 1, video 2), which Qwen2-VL needs for its 3D positions."""
    return (input_ids == image_pad_id).int() + 2 * (input_ids == video_pad_id).int()


def media_inputs(prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
    """Pixel inputs of a batch, concatenated in sequence order (the order of the pad tokens)."""
    out = {}
    for key in MEDIA_KEYS:
        parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


@dataclass
class SharedMedia:
    """Pixel inputs of the distinct prompts among a batch's rows, and which prompt each row has: the
    G responses of a prompt share its image, so the vision tower runs once for them, not G times."""

    media: dict[str, torch.Tensor]  # MEDIA_KEYS of the distinct prompts, in order
    row_prompt: list[int]  # per row: index of its distinct prompt
    images_per_prompt: list[int]
    videos_per_prompt: list[int]

    def to(self, device: torch.device) -> SharedMedia:
        media = {k: v.to(device) for k, v in self.media.items()}
        return SharedMedia(media, self.row_prompt, self.images_per_prompt, self.videos_per_prompt)


def shared_media(prompts: Sequence[EncodedPrompt]) -> SharedMedia:
    """Rows holding the same prompt object share it (the driver repeats one object per response, and
    pickling through Ray keeps that sharing)."""
    distinct = {id(p): p for p in prompts}  # first occurrence order
    index = {key: i for i, key in enumerate(distinct)}
    unique = list(distinct.values())
    count = lambda grid: 0 if grid is None else len(grid)  # noqa: E731
    return SharedMedia(
        media=media_inputs(unique),
        row_prompt=[index[id(p)] for p in prompts],
        images_per_prompt=[count(p.image_grid_thw) for p in unique],
        videos_per_prompt=[count(p.video_grid_thw) for p in unique],
    )


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row[:width], dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Generation inputs for a batch of prompts (left padding)."""
    input_ids, attention_mask = left_pad([p.input_ids for p in prompts], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **media_inputs(prompts)}


def pack_sequences(
    prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Prompt i followed by response i for every i; `responses`/`response_mask` are the right part."""
    prompt_ids, prompt_mask = left_pad([p.input_ids for p in prompts], pad_id)
    response_ids, response_mask = right_pad(responses, pad_id)
    return {
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
        "responses": response_ids,
        "response_mask": response_mask,
    }
