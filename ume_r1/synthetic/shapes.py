"""A deterministic synthetic multimodal retrieval set on rendered shapes (DESIGN.md section 7).

Rows mirror MMEB meta-tasks in equal shares: classification (image -> label), VQA (image +
question -> answer) and text-to-image retrieval, each with one hard negative. Files use the
native layout read by `ume_r1.data.rl_rows.load_examples`.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ume_r1.data.files import write_atomic
from ume_r1.data.rl_rows import RL_SCHEMA

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
TASKS = ("classification", "vqa", "retrieval")
CLASSIFY_PROMPT = "What object is shown in the image?"
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90 + 120 * k for k in range(3)]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    # star: alternate outer and inner radius around ten points
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = math.radians(-90 + 36 * k)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def noisy_canvas(rng: np.random.Generator, size: int) -> Image.Image:
    """A light grey background with a little per-pixel noise."""
    base = rng.integers(225, 250)
    noise = rng.integers(-8, 9, size=(size, size, 1))
    return Image.fromarray(np.clip(base + noise, 0, 255).repeat(3, axis=2).astype(np.uint8), "RGB")


def draw_shape(img: Image.Image, colour: str, shape: str, cx: float, cy: float, r: float) -> None:
    """Draw one filled `colour` `shape` of radius `r` centred at (cx, cy)."""
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        half = r * 0.85  # a square of radius r looks larger than a circle of radius r
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render(colour: str, shape: str, rng: np.random.Generator, size: int = 56) -> bytes:
    """PNG bytes of one `colour` `shape` at a random size and position on a lightly noisy background."""
    img = noisy_canvas(rng, size)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = (size / 2 + rng.uniform(-1, 1) * (size / 2 - r - 1) for _ in range(2))
    draw_shape(img, colour, shape, cx, cy, r)
    return png_bytes(img)


def describe(colour: str, shape: str) -> str:
    """The label text of one shape, e.g. "an orange star"."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def side_struct(text: str, image: bytes | None = None) -> dict[str, Any]:
    """One native side struct (see `ume_r1.data.rows.SIDE`) with optional PNG bytes."""
    return {"text": text, "images": [{"bytes": image, "path": None}] if image else [], "video": []}


def _hard_negative(colour: str, shape: str, rnd: random.Random) -> tuple[str, str]:
    """A description sharing one attribute with (colour, shape)."""
    if rnd.random() < 0.5:
        return rnd.choice([c for c in COLOURS if c != colour]), shape
    return colour, rnd.choice([s for s in SHAPES if s != shape])


@dataclass(frozen=True)
class RowSpec:
    """The drawn attributes of one row, before rendering; shared with the SFT set
    (ume_r1.synthetic.shapes_sft)."""

    task: str
    colour: str
    shape: str
    neg_colour: str
    neg_shape: str
    prompt: str = ""  # the query text next to the image (classification, vqa)
    answer: str = ""  # vqa: the correct colour or shape
    wrong: str = ""  # vqa: the wrong answer used as the negative


def draw_row(task: str, rnd: random.Random) -> RowSpec:
    """Draw one row's attributes from `rnd` (images are rendered separately from the numpy stream)."""
    colour, shape = rnd.choice(list(COLOURS)), rnd.choice(SHAPES)
    neg_colour, neg_shape = _hard_negative(colour, shape, rnd)
    spec = RowSpec(task, colour, shape, neg_colour, neg_shape)
    if task == "classification":
        return replace(spec, prompt=CLASSIFY_PROMPT)
    if task == "vqa":
        if rnd.random() < 0.5:
            wrong = rnd.choice([c for c in COLOURS if c != colour])
            return replace(spec, prompt=COLOUR_QUESTION, answer=colour, wrong=wrong)
        wrong = rnd.choice([s for s in SHAPES if s != shape])
        return replace(spec, prompt=SHAPE_QUESTION, answer=shape, wrong=wrong)
    return spec


def _row(task: str, rnd: random.Random, rng: np.random.Generator, size: int) -> dict[str, Any]:
    spec = draw_row(task, rnd)
    if task == "classification":
        query = side_struct(spec.prompt, render(spec.colour, spec.shape, rng, size))
        positive = side_struct(describe(spec.colour, spec.shape))
        negative = side_struct(describe(spec.neg_colour, spec.neg_shape))
    elif task == "vqa":
        query = side_struct(spec.prompt, render(spec.colour, spec.shape, rng, size))
        positive, negative = side_struct(spec.answer), side_struct(spec.wrong)
    else:
        query = side_struct(describe(spec.colour, spec.shape))
        positive = side_struct("", render(spec.colour, spec.shape, rng, size))
        negative = side_struct("", render(spec.neg_colour, spec.neg_shape, rng, size))
    return {"query": query, "positive": positive, "negatives": [negative], "task": task}


def make_synthetic(
    out_dir: str, seed: int = 0, n_train: int = 256, n_test: int = 64, image_size: int = 56
) -> dict[str, str]:
    """Write ``train.parquet`` and ``test.parquet`` under `out_dir`; same seed -> identical bytes."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        # Each split has its own streams so the test set does not depend on n_train.
        rnd = random.Random(f"ume-r1-synthetic/{seed}/{split}")
        rng = np.random.default_rng(rnd.getrandbits(64))
        rows = [_row(TASKS[i % len(TASKS)], rnd, rng, image_size) for i in range(n)]
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        write_atomic(rows, paths[split], RL_SCHEMA)
    return paths


def cli(make, description: str, n_train: int, argv: list[str] | None = None) -> None:
    """The command line shared by the synthetic set writers: `make(out, seed, n_train, n_test, size)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=56)
    args = parser.parse_args(argv)
    for split, path in make(args.out, args.seed, args.n_train, args.n_test, args.image_size).items():
        print(f"{split}: {path}")


def main(argv: list[str] | None = None) -> None:
    cli(make_synthetic, __doc__.splitlines()[0], 256, argv)


if __name__ == "__main__":
    main()
