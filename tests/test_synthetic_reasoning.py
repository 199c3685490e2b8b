"""The reasoning task family: scenes whose answer follows from the whole image (checked against plain
reference rules), chains that misread exactly as often as asked, pixels that hold what the text says,
deterministic files that the RL, SFT and evaluation loaders read."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ume_r1.data.rl_rows import load_examples
from ume_r1.data.sft_rows import load_sft_pairs
from ume_r1.data.template import FORMAT_RE, assistant_text
from ume_r1.eval.datasets import load_config, load_dataset
from ume_r1.eval.synthetic_config import make_synthetic_eval
from ume_r1.synthetic.reasoning import (
    NUMBERS,
    REASONING_TASKS,
    draw_scene,
    make_reasoning,
    query_reasoning,
    target_reasoning,
)
from ume_r1.synthetic.shapes import COLOURS

SUMMARY_RE = re.compile(r"<answer>(.*?)<gen_emb>")


def _reference_answer(scene) -> tuple[str, str]:
    """(answer, hard negative) from the drawn items by the task's plain rule."""
    items = scene.items
    if scene.task == "count":
        return NUMBERS[len(items) - 1], scene.wrong  # any other count is a fair negative
    left, right = items
    if scene.task == "compare":
        big, small = sorted(items, key=lambda it: it.radius, reverse=True)
        return big.name, small.name
    if scene.task == "spatial":
        asked, other = (left, right) if scene.question.endswith("left?") else (right, left)
        return asked.name, other.name
    asked, other = (left, right) if scene.question.endswith(f"the {left.shape}?") else (right, left)
    return asked.colour, other.colour


@pytest.mark.parametrize("task", REASONING_TASKS)
def test_scenes_answer_by_the_task_rule_and_chains_conclude_right_or_misread(task: str) -> None:
    rnd = random.Random(0)
    for _ in range(200):
        scene = draw_scene(task, rnd)
        assert (scene.answer, scene.wrong) == _reference_answer(scene) and scene.answer != scene.wrong
        if task == "count":
            assert abs(NUMBERS.index(scene.wrong) - NUMBERS.index(scene.answer)) == 1
        else:  # two shapes that differ in both colour and shape: the question picks exactly one
            assert len({it.colour for it in scene.items}) == len({it.shape for it in scene.items}) == 2
        for misread, concluded in ((False, scene.answer), (True, scene.wrong)):
            reasoning, summary = query_reasoning(scene, misread, rnd)
            assert summary == concluded
            if task == "count":  # the chain lists as many shapes as it concludes
                listed = reasoning.split(". That makes")[0]
                assert listed.count(",") + listed.count(" and ") + 1 == NUMBERS.index(summary) + 1
            assert FORMAT_RE.fullmatch(assistant_text(reasoning, summary))
        assert scene.answer in target_reasoning(scene)


def test_files_are_deterministic_and_misread_at_the_asked_rate(tmp_path: Path) -> None:
    a = make_reasoning(str(tmp_path / "a"), seed=3, n_train=16, n_test=8, n_sft_train=400, sft_noise=0.3)
    b = make_reasoning(str(tmp_path / "b"), seed=3, n_train=16, n_test=8, n_sft_train=400, sft_noise=0.3)
    assert all(Path(a[k]).read_bytes() == Path(b[k]).read_bytes() for k in a)
    c = make_reasoning(str(tmp_path / "c"), seed=4, n_train=16, n_test=8, n_sft_train=8)
    assert Path(a["test"]).read_bytes() != Path(c["test"]).read_bytes()

    rows = pq.read_table(a["sft_train"]).to_pylist()
    assert [r["task"] for r in rows[:8]] == list(REASONING_TASKS) * 2
    wrong = [SUMMARY_RE.search(r["query_response"])[1] != r["positive"]["text"] for r in rows]
    assert abs(np.mean(wrong) - 0.3) < 0.08  # binomial: 400 draws, SE 0.023
    # the targets' chains are always right
    assert all(SUMMARY_RE.search(r["positive_response"])[1] == r["positive"]["text"] for r in rows)
    for noise, share in ((0.0, 0.0), (1.0, 1.0)):
        d = make_reasoning(str(tmp_path / f"n{noise}"), n_train=4, n_test=4, n_sft_train=40, sft_noise=noise)
        sft = pq.read_table(d["sft_train"]).to_pylist()
        assert (
            np.mean([SUMMARY_RE.search(r["query_response"])[1] != r["positive"]["text"] for r in sft])
            == share
        )
    with pytest.raises(ValueError, match="sft_noise"):
        make_reasoning(str(tmp_path / "bad"), sft_noise=1.5)


def test_images_hold_the_named_colours_and_the_loaders_read_the_files(tmp_path: Path) -> None:
    paths = make_reasoning(str(tmp_path), seed=0, n_train=8, n_test=8, n_sft_train=8)
    for row in pq.read_table(paths["train"]).to_pylist():
        pixels = np.asarray(Image.open(io.BytesIO(row["query"]["images"][0]["bytes"])).convert("RGB"))
        colours = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(-1).sum() >= 10}
        if row["task"] == "compose":  # both shapes' colours are drawn; answer and negative are theirs
            assert {row["positive"]["text"], row["negatives"][0]["text"]} == colours
        else:
            assert colours and all(c in COLOURS for c in colours)
    examples, report = load_examples(paths["train"])
    assert report.loaded == len(examples) == 8 and all(
        len(e.query.images) == 1 and e.negatives for e in examples
    )
    assert load_sft_pairs(paths["sft_train"])[1].loaded == 8

    config = make_synthetic_eval(paths["test"], str(tmp_path / "eval"))
    names = [d["name"] for d in yaml.safe_load(Path(config).read_text())["datasets"]]
    assert names == [f"synthetic_{t}" for t in REASONING_TASKS]
    count = load_dataset(next(s for s in load_config(config) if s.name == "synthetic_count"))
    for row in count.rows:  # candidates: the counts seen in the test split; the label is the right one
        assert {c.text for c in row.candidates} <= set(NUMBERS)
        assert row.candidates[row.labels[0]].text in NUMBERS
