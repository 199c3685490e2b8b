"""Turn one side of a pair (text + images / video frames) into model inputs, without torchvision.

Images go through transformers' PIL image processor for Qwen2-VL. A video is a list of PIL frames,
resized to one shared size and cut into Qwen2-VL's temporal x spatial patches here. Each image /
video placeholder in the prompt is expanded to the number of merged patches it occupies. The tokenizer
and image processor come from a local checkpoint directory (never a hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from ume_r1.data.files import TooLong
from ume_r1.data.media import MediaLimits, decode_image, decode_video
from ume_r1.data.rows import Side
from ume_r1.data.template import DISC_EMB, GEN_EMB, IMAGE_PAD, VIDEO_PAD, chat_prompt, user_text


def check_local_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a local HF checkpoint directory, else an error saying so."""
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

    tokenizer = AutoTokenizer.from_pretrained(check_local_dir(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def load_image_processor(path: str | os.PathLike, max_pixels: int | None = None) -> Qwen2VLImageProcessorPil:
    """The PIL image processor (no torchvision needed); `max_pixels` caps image resolution."""
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    if (Path(path) / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True, **kwargs)
    return Qwen2VLImageProcessorPil(**kwargs)


@dataclass
class EncodedPrompt:
    """A tokenised prompt and its pixel inputs (None when the side has no such media). `images` and
    `video` are the media already resized to the model's patch grid: what a rollout engine that runs
    its own processor (vLLM) is given, so both backends see the same pixels."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    images: list[Image.Image] | None = None
    video: list[Image.Image] | None = None
    truncated: bool = False  # the side's text was cut to fit max_prompt_length

    def key(self) -> tuple:
        """Identity for de-duplication: same tokens and same pixels means the same prompt."""
        pixels = tuple(
            hash(t.numpy().tobytes()) if t is not None else None
            for t in (self.pixel_values, self.pixel_values_videos)
        )
        return (tuple(self.input_ids), pixels)


class UMEProcessor:
    def __init__(
        self, tokenizer, image_processor, max_prompt_length: int = 4096, limits: MediaLimits | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_prompt_length = max_prompt_length
        self.limits = limits or MediaLimits()
        vocab = tokenizer.get_vocab()
        self.image_pad_id = vocab[IMAGE_PAD]
        self.video_pad_id = vocab[VIDEO_PAD]
        self.disc_emb_id = vocab[DISC_EMB]
        self.gen_emb_id = vocab[GEN_EMB]
        self.pad_id = tokenizer.pad_token_id
        self.merge = image_processor.merge_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        max_prompt_length: int = 4096,
        max_pixels: int | None = None,
        limits: MediaLimits | None = None,
    ) -> UMEProcessor:
        tokenizer = load_tokenizer(path)
        for token in (DISC_EMB, GEN_EMB):
            if token not in tokenizer.get_vocab():
                raise ValueError(
                    f"tokenizer in '{path}' has no {token} token: it is not a UME model "
                    "(cold-start SFT turns a stock Qwen2-VL checkpoint into one: python -m sft.train "
                    "model.path=... adds the tokens on the way in)"
                )
        return cls(tokenizer, load_image_processor(path, max_pixels), max_prompt_length, limits)

    def encode(self, side: Side, truncate: bool = False) -> EncodedPrompt:
        """Model inputs of one side; references to media are decoded here. A prompt over
        `max_prompt_length` raises `TooLong`, or with `truncate` loses the end of its text to fit (the
        template and the media stay whole)."""
        prompt = chat_prompt(side.text, num_images=len(side.images), has_video=bool(side.video))
        encoded = EncodedPrompt(input_ids=[])
        if side.images:
            encoded.images = [self.resized(decode_image(image, self.limits)) for image in side.images]
            feats = self.image_processor(images=encoded.images, return_tensors="pt")
            encoded.pixel_values, encoded.image_grid_thw = feats["pixel_values"], feats["image_grid_thw"]
            prompt = self._expand(prompt, IMAGE_PAD, encoded.image_grid_thw)
        if side.video:
            frames = decode_video(side.video, self.limits)
            size = self.frame_size(frames[0], len(frames))
            encoded.video = [frame.convert("RGB").resize(size, Image.BICUBIC) for frame in frames]
            encoded.pixel_values_videos, encoded.video_grid_thw = self.video_patches(encoded.video)
            prompt = self._expand(prompt, VIDEO_PAD, encoded.video_grid_thw)
        encoded.input_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        over = len(encoded.input_ids) - self.max_prompt_length
        text_ids = self.tokenizer(side.text, add_special_tokens=False)["input_ids"] if truncate else []
        while 0 < over < len(text_ids):  # shorter each time: a re-tokenised cut may differ by a token
            text_ids = text_ids[: len(text_ids) - over]
            cut = prompt.replace(user_text(side.text), user_text(self.tokenizer.decode(text_ids)), 1)
            encoded.input_ids = self.tokenizer(cut, add_special_tokens=False)["input_ids"]
            encoded.truncated, over = True, len(encoded.input_ids) - self.max_prompt_length
        if over > 0:
            raise TooLong(
                f"prompt has {len(encoded.input_ids)} tokens, over data.max_prompt_length="
                f"{self.max_prompt_length}{' even with its text cut' if truncate else ''} "
                f"(text starts {side.text[:60]!r})"
            )
        return encoded

    def _expand(self, prompt: str, pad: str, grids: torch.Tensor) -> str:
        # Replace each single placeholder, in order, by one pad per merged patch.
        pieces = prompt.split(pad)
        counts = (grids.prod(-1) // self.merge**2).tolist()
        return "".join(p + pad * n for p, n in zip(pieces[:-1], counts, strict=True)) + pieces[-1]

    def resized(self, image: Image.Image) -> Image.Image:
        """RGB, resized to the patch grid Qwen2-VL's processor picks (smart_resize within min/max pixels);
        processing it again at that size is the identity, whichever processor does it."""
        ip = self.image_processor
        w, h = image.size
        rh, rw = smart_resize(
            h,
            w,
            factor=ip.patch_size * ip.merge_size,
            min_pixels=ip.size["shortest_edge"],
            max_pixels=ip.size["longest_edge"],
        )
        image = image.convert("RGB")
        return image if image.size == (rw, rh) else image.resize((rw, rh), Image.BICUBIC)

    def frame_size(self, frame: Image.Image, frames: int) -> tuple[int, int]:
        """(width, height) of every frame of a `frames`-frame video: the patch grid within the video's
        own budget (`MediaLimits.frame_pixels`), not the images'. Within the video processor's bounds,
        so vLLM's processor, given the same bounds, keeps the size."""
        ip, limits = self.image_processor, self.limits
        w, h = frame.size
        rh, rw = smart_resize(
            h,
            w,
            factor=ip.patch_size * ip.merge_size,
            min_pixels=limits.video_min_pixels,
            max_pixels=limits.frame_pixels(frames, ip.temporal_patch_size),
        )
        return rw, rh

    def video_patches(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL video patches: frames resized to one size (`frame_size`), normalised, grouped in time by
        temporal_patch_size (the last frame repeated to fill the group), flattened per merged window."""
        ip = self.image_processor
        patch, tps, merge = ip.patch_size, ip.temporal_patch_size, ip.merge_size
        rw, rh = self.frame_size(frames[0], len(frames))
        mean, std = (
            np.asarray(ip.image_mean).reshape(1, 3, 1, 1),
            np.asarray(ip.image_std).reshape(1, 3, 1, 1),
        )
        video = np.stack([np.asarray(f.convert("RGB").resize((rw, rh), Image.BICUBIC)) for f in frames])
        video = (video.transpose(0, 3, 1, 2) / 255.0 - mean) / std
        if len(video) % tps:
            video = np.concatenate([video, np.repeat(video[-1:], tps - len(video) % tps, axis=0)])
        gt, gh, gw = len(video) // tps, rh // patch, rw // patch
        video = video.reshape(gt, tps, 3, gh // merge, merge, patch, gw // merge, merge, patch)
        video = video.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tps * patch * patch)
        return torch.from_numpy(video.astype(np.float32)), torch.tensor([[gt, gh, gw]])
