"""A deterministic synthetic chain-of-thought SFT set on rendered shapes (paper section 2, stage 1 data).

Rows are drawn and rendered as in `ume_r1.synthetic.shapes` (same colours, shapes, prompts and tasks) and
each side gets a short templated reasoning and a summary. A query and its positive always share the
summary, so a generative embedding read after the summary can learn to match them:

* classification: image + prompt -> "a red circle"; label text "a red circle" -> "a red circle".
* vqa: image + question -> the answer ("red"); answer text "red" -> "red".
* retrieval: caption "a blue square" -> "a blue square"; image -> "a blue square".

Files use the layout read by `ume_r1.data.sft_rows.load_sft_pairs`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

from ume_r1.data.files import write_atomic
from ume_r1.data.sft_rows import SFT_SCHEMA
from ume_r1.data.template import assistant_text
from ume_r1.synthetic.shapes import (
    COLOUR_QUESTION,
    TASKS,
    RowSpec,
    cli,
    describe,
    draw_row,
    render,
    side_struct,
)

# Two or three wordings per turn keep the reasoning from being one fixed string, yet short enough
# for a tiny model to learn on a CPU in minutes.
IMAGE_SEEN = (
    "The image shows {obj} on a grey background.",
    "There is {obj} in the picture.",
    "I see {obj} drawn on a light background.",
)
LABEL_SEEN = (
    "The text names {obj}.",
    "The label says {obj}.",
    "This is the label for {obj}.",
)
CAPTION_SEEN = (
    "The text describes {obj}.",
    "The caption asks for an image of {obj}.",
)
QUESTION_ASKS = (
    " The question asks for its {attr}.",
    " The question asks which {attr} it has.",
)
ANSWER_SEEN = (
    "The text gives the {attr} {answer}.",
    "The word {answer} names a {attr}.",
)


def _turn(rnd: random.Random, templates: tuple[str, ...], summary: str, **fields: str) -> str:
    return assistant_text(rnd.choice(templates).format(**fields), summary)


def _sft_row(spec: RowSpec, rnd: random.Random, rng: np.random.Generator, size: int) -> dict[str, Any]:
    obj = describe(spec.colour, spec.shape)
    if spec.task == "classification":
        query = side_struct(spec.prompt, render(spec.colour, spec.shape, rng, size))
        query_response = _turn(rnd, IMAGE_SEEN, obj, obj=obj)
        positive, positive_response = side_struct(obj), _turn(rnd, LABEL_SEEN, obj, obj=obj)
    elif spec.task == "vqa":
        attr = "colour" if spec.prompt == COLOUR_QUESTION else "shape"
        query = side_struct(spec.prompt, render(spec.colour, spec.shape, rng, size))
        reasoning = rnd.choice(IMAGE_SEEN).format(obj=obj) + rnd.choice(QUESTION_ASKS).format(attr=attr)
        query_response = assistant_text(reasoning, spec.answer)
        positive = side_struct(spec.answer)
        positive_response = _turn(rnd, ANSWER_SEEN, spec.answer, attr=attr, answer=spec.answer)
    else:
        query, query_response = side_struct(obj), _turn(rnd, CAPTION_SEEN, obj, obj=obj)
        positive = side_struct("", render(spec.colour, spec.shape, rng, size))
        positive_response = _turn(rnd, IMAGE_SEEN, obj, obj=obj)
    return {
        "query": query,
        "query_response": query_response,
        "positive": positive,
        "positive_response": positive_response,
        "task": spec.task,
    }


def make_synthetic_sft(
    out_dir: str, seed: int = 0, n_train: int = 512, n_test: int = 64, image_size: int = 56
) -> dict[str, str]:
    """Write ``sft_train.parquet`` and ``sft_test.parquet`` under `out_dir`; same seed -> identical bytes."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        # Streams of their own: the SFT rows differ from the RL set's for the same seed (the paper
        # samples RL pairs outside the SFT data), and the test split does not depend on n_train.
        rnd = random.Random(f"ume-r1-sft/{seed}/{split}")
        rng = np.random.default_rng(rnd.getrandbits(64))
        wording = random.Random(rnd.getrandbits(64))  # template choice never shifts the row draws
        rows = [_sft_row(draw_row(TASKS[i % len(TASKS)], rnd), wording, rng, image_size) for i in range(n)]
        paths[split] = os.path.join(out_dir, f"sft_{split}.parquet")
        write_atomic(rows, paths[split], SFT_SCHEMA)
    return paths


def main(argv: list[str] | None = None) -> None:
    cli(make_synthetic_sft, (__doc__ or "").splitlines()[0], 512, argv)


if __name__ == "__main__":
    main()
