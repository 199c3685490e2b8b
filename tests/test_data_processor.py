"""The processor against the image processor and hand counts: image and video patches, placeholders,
length limits, and a tokenizer without the UME tokens named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_image

from ume_r1.data.collate import media_inputs
from ume_r1.data.files import TooLong
from ume_r1.data.media import MediaLimits
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import Side
from ume_r1.data.template import (
    VISION_START,
)
from ume_r1.grpo.grouping import encode_example, plan_prompts
from ume_r1.model.tiny import _train_tiny_tokenizer


def test_processor_rejects_tokenizer_without_gen_emb(tiny_model_dir: str, tmp_path: Path) -> None:
    shutil.copy(Path(tiny_model_dir) / "config.json", tmp_path / "config.json")
    tokenizer = _train_tiny_tokenizer(512, [])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<disc_emb>"]})
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<gen_emb>"):
        UMEProcessor.from_pretrained(tmp_path)


def test_encode_image_side(processor: UMEProcessor) -> None:
    images = [random_image(0, 56, 56), random_image(1, 84, 40)]
    encoded = processor.encode(Side("a red circle", images=images))
    merge = processor.image_processor.merge_size
    grid = encoded.image_grid_thw
    assert grid.shape == (2, 3)
    assert encoded.input_ids.count(processor.image_pad_id) == int(grid.prod(-1).sum()) // merge**2
    assert encoded.pixel_values.shape[0] == int(grid.prod(-1).sum())
    assert encoded.pixel_values_videos is None and encoded.video_grid_thw is None
    # The image pads sit in two runs, one per image, sized by that image's grid.
    ids = encoded.input_ids
    start = processor.tokenizer.convert_tokens_to_ids(VISION_START)
    runs = []
    for i, tok in enumerate(ids):
        if tok == start:
            j = i + 1
            while ids[j] == processor.image_pad_id:
                j += 1
            runs.append(j - i - 1)
    assert runs == (grid.prod(-1) // merge**2).tolist()
    assert processor.disc_emb_id in ids


def test_encode_text_side_has_no_pixels(processor: UMEProcessor) -> None:
    encoded = processor.encode(Side("just some text"))
    assert encoded.pixel_values is None and encoded.image_grid_thw is None
    assert encoded.pixel_values_videos is None and encoded.video_grid_thw is None
    assert processor.image_pad_id not in encoded.input_ids
    assert processor.video_pad_id not in encoded.input_ids
    assert media_inputs([encoded]) == {}


def test_encode_too_long_prompt_raises(processor: UMEProcessor) -> None:
    short = UMEProcessor(processor.tokenizer, processor.image_processor, max_prompt_length=10)
    with pytest.raises(TooLong, match=r"data\.max_prompt_length"):
        short.encode(Side("hello"))


def test_video_patches_match_image_processor(processor: UMEProcessor) -> None:
    ip = processor.image_processor  # video frames sized as the images are, to compare the patches
    bounds = MediaLimits(
        video_min_pixels=int(ip.size["shortest_edge"] / 1.1), video_max_pixels=ip.size["longest_edge"]
    )
    processor = UMEProcessor(processor.tokenizer, ip, limits=bounds)
    frame = random_image(3, 70, 42)
    image = processor.image_processor(images=[frame], return_tensors="pt")
    pixels, grid = processor.video_patches([frame, frame.copy()])
    assert grid.tolist() == [[1, *image["image_grid_thw"][0, 1:].tolist()]]
    assert image["image_grid_thw"][0, 0] == 1
    torch.testing.assert_close(pixels, image["pixel_values"].float(), rtol=0, atol=1e-5)

    _, grid3 = processor.video_patches([frame, random_image(4, 70, 42), random_image(5, 70, 42)])
    assert grid3[0, 0].item() == 2 and grid3[0, 1:].tolist() == grid[0, 1:].tolist()

    encoded = processor.encode(Side("a video", video=[frame, frame]))
    merge = processor.image_processor.merge_size
    assert encoded.input_ids.count(processor.video_pad_id) == int(encoded.video_grid_thw.prod()) // merge**2
    assert encoded.pixel_values is None


def test_synthetic_fixture_loads(synthetic_dir: dict[str, str], processor: UMEProcessor) -> None:
    from ume_r1.data.rl_rows import load_examples

    examples, report = load_examples(synthetic_dir["train"])
    assert report.loaded == 48 and len(examples) == 48
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples[:6]])
    assert plan.roles.count("query") == 6
    for prompt, role in zip(plan.prompts, plan.roles, strict=True):
        assert processor.disc_emb_id in prompt.input_ids, role
