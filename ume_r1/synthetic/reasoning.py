"""A synthetic task family where the reasoning decides the answer (issue 11; the RL stage's proving ground).

Every image holds several shapes, and the retrieval target names something that must be inferred
from the whole scene; the hard negative is another thing in the same image, so reading one shape
is not enough:

* count: "How many shapes are in the image?" -> "three" (one to four shapes on a 2 x 2 grid).
* compare: "Which shape is larger?" -> "a blue square" (the smaller shape is the negative).
* spatial: "What is on the left?" -> "a red circle" (the other side's shape is the negative).
* compose: "What colour is the square?" -> "blue" (the other shape's colour is the negative).

The SFT split teaches the format with chains that are *imperfect on purpose*: with probability
`sft_noise` a query's chain misreads the scene (one shape too few or too many, the sizes, sides or
colours swapped) and its summary names the hard negative, so the cold-started model is right only
some of the time and the RL reward has something to correct. Its targets' chains are always right.

`make_reasoning(out_dir)` writes the RL files (`train.parquet`, `test.parquet`, read by
`ume_r1.data.rl_rows`) and the SFT files (`sft_train.parquet`, `sft_test.parquet`, read by
`ume_r1.data.sft_rows`); the same seed gives identical bytes. `ume_r1.eval.evaluate --make-synthetic-config`
turns `test.parquet` into one retrieval set per task.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ume_r1.data.files import write_atomic
from ume_r1.data.rl_rows import RL_SCHEMA
from ume_r1.data.sft_rows import SFT_SCHEMA
from ume_r1.data.template import assistant_text
from ume_r1.synthetic.shapes import (
    COLOURS,
    SHAPES,
    describe,
    draw_shape,
    noisy_canvas,
    png_bytes,
    side_struct,
)

REASONING_TASKS = ("count", "compare", "spatial", "compose")
NUMBERS = ("one", "two", "three", "four")
COUNT_QUESTION = "How many shapes are in the image?"
COMPARE_QUESTION = "Which shape is larger?"
SIDE_QUESTION = "What is on the {side}?"
COLOUR_OF_QUESTION = "What colour is the {shape}?"


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    x: float  # centre, as a fraction of the image side
    y: float
    radius: float  # as a fraction of the image side

    @property
    def name(self) -> str:
        return describe(self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """One drawn row: the shapes, the question, the right answer and the hard negative."""

    task: str
    items: tuple[Item, ...]
    question: str
    answer: str
    wrong: str

    def image(self, rng: np.random.Generator, size: int) -> bytes:
        img = noisy_canvas(rng, size)
        for it in self.items:
            jitter = rng.uniform(-0.04, 0.04, size=2) * size
            draw_shape(
                img, it.colour, it.shape, it.x * size + jitter[0], it.y * size + jitter[1], it.radius * size
            )
        return png_bytes(img)


def _two_items(rnd: random.Random, radii: tuple[float, float] = (0.17, 0.17)) -> tuple[Item, Item]:
    """A left and a right shape that differ in colour and in shape."""
    colours, shapes = rnd.sample(list(COLOURS), 2), rnd.sample(SHAPES, 2)
    return (
        Item(colours[0], shapes[0], 0.25, 0.5, radii[0]),
        Item(colours[1], shapes[1], 0.75, 0.5, radii[1]),
    )


def draw_scene(task: str, rnd: random.Random) -> Scene:
    """Draw one row's scene for `task` from `rnd` (pixels are rendered separately)."""
    if task == "count":
        k = rnd.randint(1, 4)
        cells = sorted(rnd.sample(range(4), k))
        items = tuple(
            Item(
                rnd.choice(list(COLOURS)),
                rnd.choice(SHAPES),
                0.25 + 0.5 * (c % 2),
                0.25 + 0.5 * (c // 2),
                0.15,
            )
            for c in cells
        )
        wrong = k + 1 if k == 1 or (k < 4 and rnd.random() < 0.5) else k - 1
        return Scene(task, items, COUNT_QUESTION, NUMBERS[k - 1], NUMBERS[wrong - 1])
    if task == "compare":
        big = rnd.randrange(2)
        left, right = _two_items(rnd, (0.2, 0.09) if big == 0 else (0.09, 0.2))
        pair = (left, right)
        return Scene(task, pair, COMPARE_QUESTION, pair[big].name, pair[1 - big].name)
    if task == "spatial":
        pair = _two_items(rnd)
        asked = rnd.randrange(2)
        question = SIDE_QUESTION.format(side=("left", "right")[asked])
        return Scene(task, pair, question, pair[asked].name, pair[1 - asked].name)
    if task == "compose":
        pair = _two_items(rnd)
        asked = rnd.randrange(2)
        question = COLOUR_OF_QUESTION.format(shape=pair[asked].shape)
        return Scene(task, pair, question, pair[asked].colour, pair[1 - asked].colour)
    raise ValueError(f"unknown reasoning task '{task}'; expected one of {REASONING_TASKS}")


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def query_reasoning(scene: Scene, misread: bool, rnd: random.Random) -> tuple[str, str]:
    """The query's (reasoning, summary); a misread chain sees the scene wrongly and concludes `wrong`."""
    items = list(scene.items)
    if scene.task == "count":
        names = [it.name for it in items]
        if misread:  # one shape missed, or one seen twice
            k = NUMBERS.index(scene.wrong) + 1
            names = names[:k] if k < len(names) else names + [rnd.choice(names)]
        return f"I see {_listing(names)}. That makes {NUMBERS[len(names) - 1]}.", NUMBERS[len(names) - 1]
    left, right = items
    if scene.task == "compare":
        big, small = (left, right) if left.radius > right.radius else (right, left)
        if misread:
            big, small = small, big
        return (
            f"The image shows a small {small.colour} {small.shape} and a large {big.colour} {big.shape}. "
            f"The larger one is the {big.colour} {big.shape}.",
            big.name,
        )
    if scene.task == "spatial":
        if misread:
            left, right = right, left
        side = "left" if "left" in scene.question else "right"
        answer = left if side == "left" else right
        return f"On the left is {left.name} and on the right is {right.name}.", answer.name
    # compose
    shown = (left, right)
    if misread:  # the colours swapped between the two shapes
        shown = (replace(left, colour=right.colour), replace(right, colour=left.colour))
    asked = next(it for it in shown if f" {it.shape}?" in scene.question)
    return (
        f"The image shows {shown[0].name} and {shown[1].name}. The {asked.shape} is {asked.colour}.",
        asked.colour,
    )


def target_reasoning(scene: Scene) -> str:
    """The positive text side's reasoning: it only restates what the text names."""
    if scene.task == "count":
        return f"The text gives the number {scene.answer}."
    if scene.task == "compose":
        return f"The text names the colour {scene.answer}."
    return f"The text names {scene.answer}."


def _rl_row(scene: Scene, rng: np.random.Generator, size: int) -> dict[str, Any]:
    return {
        "query": side_struct(scene.question, scene.image(rng, size)),
        "positive": side_struct(scene.answer),
        "negatives": [side_struct(scene.wrong)],
        "task": scene.task,
    }


def _sft_row(
    scene: Scene, rng: np.random.Generator, size: int, rnd: random.Random, noise: float
) -> dict[str, Any]:
    reasoning, summary = query_reasoning(scene, rnd.random() < noise, rnd)
    return {
        "query": side_struct(scene.question, scene.image(rng, size)),
        "query_response": assistant_text(reasoning, summary),
        "positive": side_struct(scene.answer),
        "positive_response": assistant_text(target_reasoning(scene), scene.answer),
        "task": scene.task,
    }


def make_reasoning(
    out_dir: str,
    seed: int = 0,
    n_train: int = 256,
    n_test: int = 256,
    n_sft_train: int = 512,
    image_size: int = 56,
    sft_noise: float = 0.3,
) -> dict[str, str]:
    """Write the RL (`train`, `test`) and SFT (`sft_train`, `sft_test`) parquet files under `out_dir`."""
    if not 0 <= sft_noise <= 1:
        raise ValueError(f"sft_noise must be in [0, 1], got {sft_noise}")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    splits = (("train", n_train, False), ("test", n_test, False), ("sft_train", n_sft_train, True),
              ("sft_test", 64, True))  # fmt: skip
    for split, n, sft in splits:
        # One stream per split: no split depends on another's size, and RL rows differ from SFT rows.
        rnd = random.Random(f"ume-r1-reasoning/{seed}/{split}")
        rng = np.random.default_rng(rnd.getrandbits(64))
        chains = random.Random(rnd.getrandbits(64))  # misreads never shift the scene draws
        scenes = [draw_scene(REASONING_TASKS[i % len(REASONING_TASKS)], rnd) for i in range(n)]
        if sft:
            rows = [_sft_row(s, rng, image_size, chains, sft_noise) for s in scenes]
        else:
            rows = [_rl_row(s, rng, image_size) for s in scenes]
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        write_atomic(rows, paths[split], SFT_SCHEMA if sft else RL_SCHEMA)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=256, help="RL training rows")
    parser.add_argument("--n-test", type=int, default=256, help="held-out rows (64 per task)")
    parser.add_argument("--n-sft-train", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--sft-noise", type=float, default=0.3, help="share of SFT query chains that misread")
    args = parser.parse_args(argv)
    paths = make_reasoning(
        args.out, args.seed, args.n_train, args.n_test, args.n_sft_train, args.image_size, args.sft_noise
    )
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
