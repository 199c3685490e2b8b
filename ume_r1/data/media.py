"""Media a data row names: images (a file path, raw bytes or base64 in JSON) and video (frame files, a
directory of frames, or a video file). Loading a row keeps references and checks only what is cheap
(the bytes are there, the file exists and is a file); pixels are decoded when a batch is encoded, in a
DataLoader worker, so memory follows the batch, not the data set.

Decoding refuses an image whose header declares more than `MediaLimits.max_image_pixels` before any
pixel is decoded (a decompression bomb: a small PNG can declare 12000 x 12000).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ume_r1.data.files import RowProblem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass(frozen=True)
class MediaLimits:
    """`data.max_image_pixels`: the largest image (width x height, from its header) decoded at all.
    `data.video_max_frames`: frames sampled evenly from a video file. A video's pixel budget, apart from
    the images' (qwen-vl-utils' rule): each frame within `video_min_pixels`..`video_max_pixels`
    (Qwen2-VL's video processor bounds, 128 and 768 merged patches) and all frames together within
    `video_total_pixels` (3,584 merged patches: 32 frames in a 4,096-token prompt with room for text)."""

    max_image_pixels: int = 89_478_485  # PIL's own warning threshold (about 9459 x 9459)
    video_max_frames: int = 32
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = 3584 * 28 * 28

    @classmethod
    def from_config(cls, data_cfg: Any) -> MediaLimits:
        defaults = cls()
        return cls(**{k: int(data_cfg.get(k, getattr(defaults, k))) for k in cls.__dataclass_fields__})

    def frame_pixels(self, frames: int, temporal_patch_size: int) -> int:
        """The most pixels one frame of a `frames`-frame video may have: the total shared by the frames
        (each group of `temporal_patch_size` frames makes one set of patches), within the frame bounds."""
        share = self.video_total_pixels / frames * temporal_patch_size
        return int(max(min(self.video_max_pixels, share), self.video_min_pixels * 1.05))


@dataclass(frozen=True)
class ImageRef:
    """An image not yet decoded: a resolved file path or encoded bytes; `shown` names it in errors."""

    shown: str
    path: str | None = None
    data: bytes | None = None

    def decode(self, limits: MediaLimits) -> Image.Image:
        source = io.BytesIO(self.data) if self.data is not None else self.path
        try:
            with warnings.catch_warnings():  # PIL's own bomb warning: the check below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(source)
            with img:
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise RowProblem(
                        f"{self.shown} is {width} x {height} = {width * height:,} pixels, over "
                        f"data.max_image_pixels={limits.max_image_pixels:,} (left undecoded: a "
                        "decompression bomb guard)"
                    )
                img.load()
                return img.convert("RGB")
        except FileNotFoundError as e:
            raise RowProblem(f"{self.shown} not found") from e
        except Image.UnidentifiedImageError as e:
            raise RowProblem(f"{self.shown} is unreadable: not an image format PIL knows") from e
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RowProblem(f"{self.shown} is unreadable: {e}") from e


@dataclass(frozen=True)
class VideoFile:
    """A video file, decoded (OpenCV) into at most `MediaLimits.video_max_frames` evenly spaced frames."""

    shown: str
    path: str

    def decode(self, limits: MediaLimits) -> list[Image.Image]:
        try:
            import cv2
        except ImportError as e:
            raise RowProblem(
                f"{self.shown}: decoding a video file needs OpenCV (pip install opencv-python-headless); "
                "or give the video as frame files or a frame directory"
            ) from e
        total = self._count(cv2)
        if total == 0:
            raise RowProblem(f"{self.shown} has no decodable frames")
        keep = set(
            np.linspace(0, total - 1, min(total, limits.video_max_frames)).round().astype(int).tolist()
        )
        frames = []
        capture = cv2.VideoCapture(self.path)
        try:  # one pass, holding only the frames kept: a long video never sits in memory whole
            for index in range(total):
                if not capture.grab():
                    break
                if index in keep:
                    ok, frame = capture.retrieve()
                    if ok:
                        frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        finally:
            capture.release()
        if not frames:
            raise RowProblem(f"{self.shown} has no decodable frames")
        return frames

    def _count(self, cv2) -> int:
        """Frames in the file: from the container when it says, else by stepping through them."""
        capture = cv2.VideoCapture(self.path)
        try:
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            if count <= 0:
                count = 0
                while capture.grab():
                    count += 1
            return count
        finally:
            capture.release()


Media = Image.Image | ImageRef
Video = list[Media] | VideoFile


def decode_image(item: Media, limits: MediaLimits) -> Image.Image:
    return item.decode(limits) if isinstance(item, ImageRef) else item.convert("RGB")


def decode_video(video: Video, limits: MediaLimits) -> list[Image.Image]:
    if isinstance(video, VideoFile):
        return video.decode(limits)
    return [decode_image(frame, limits) for frame in video]


def _resolve(path: str, root: str, what: str) -> tuple[str, str]:
    full = path if os.path.isabs(path) else os.path.join(root, path)
    shown = f"{what} '{path}'" if full == path else f"{what} '{path}' (resolved to '{full}')"
    return full, shown


def image_ref(entry: Any, root: str, what: str) -> ImageRef:
    """One image of a row: ``{bytes, path}`` (bytes raw, or base64 in JSON) or a path string. The path
    must name an existing file (not a directory); its pixels are not read here."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if entry is not None and not isinstance(entry, dict):
        raise RowProblem(f"{what} should be an object with bytes or path, found {type(entry).__name__}")
    data, path = (entry or {}).get("bytes"), (entry or {}).get("path")
    if isinstance(data, str):  # JSON files carry image bytes as base64
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise RowProblem(f"{what} bytes are a string but not base64 ({e})") from e
    if data:
        return ImageRef(shown=f"{what} ({len(data)} bytes)", data=bytes(data))
    if not path:
        raise RowProblem(f"{what} has neither bytes nor path")
    if not isinstance(path, str):
        raise RowProblem(f"{what} path should be a string, found {type(path).__name__}")
    full, shown = _resolve(path, root, what)
    if os.path.isdir(full):
        raise RowProblem(f"{shown} is a directory, not an image file")
    if not os.path.isfile(full):
        raise RowProblem(f"{shown} not found")
    return ImageRef(shown=shown, path=full)


def image_refs(entries: Any, root: str, what: str) -> list[ImageRef]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise RowProblem(f"{what}s should be a list, found {type(entries).__name__}")
    return [image_ref(entry, root, f"{what} {k}") for k, entry in enumerate(entries)]


def _single_path(value: Any) -> str | None:
    """The path when a video is given as one path: a string, or a list of one path-only entry."""
    only = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(only, dict) and not only.get("bytes"):
        only = only.get("path")
    return only if isinstance(only, str) else None


def video_ref(value: Any, root: str, what: str) -> Video | None:
    """A video: a list of frames (each like an image), or one path naming a directory of frame files
    (taken in name order) or a video file."""
    if value is None or value == []:
        return None
    single = _single_path(value)
    full, shown = _resolve(single, root, what) if single else ("", "")
    if os.path.isdir(full):
        names = sorted(n for n in os.listdir(full) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise RowProblem(f"{shown} is a directory without frame images ({', '.join(IMAGE_SUFFIXES)})")
        return [ImageRef(shown=f"{shown} frame '{n}'", path=os.path.join(full, n)) for n in names]
    if single and full.lower().endswith(VIDEO_SUFFIXES):
        if not os.path.isfile(full):
            raise RowProblem(f"{shown} not found")
        return VideoFile(shown=shown, path=full)
    return image_refs([value] if isinstance(value, str) else value, root, f"{what} frame")
