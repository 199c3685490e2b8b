"""Tests for the RL row loaders (ume_r1.data.rl_rows) and the synthetic set (ume_r1.synthetic.shapes)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ume_r1.data.media import ImageRef, MediaLimits, decode_image
from ume_r1.data.rl_rows import RL_SCHEMA, load_examples
from ume_r1.data.rows import BadRowError
from ume_r1.synthetic.shapes import TASKS, make_synthetic


def _bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic(str(tmp_path / "a"), seed=3, n_train=12, n_test=6)
    b = make_synthetic(str(tmp_path / "b"), seed=3, n_train=12, n_test=6)
    c = make_synthetic(str(tmp_path / "c"), seed=4, n_train=12, n_test=6)
    for split in ("train", "test"):
        assert _bytes(a[split]) == _bytes(b[split])
        assert _bytes(a[split]) != _bytes(c[split])
    assert _bytes(a["train"]) != _bytes(a["test"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test.parquet", "train.parquet"]


def test_synthetic_rows_load_back(tmp_path: Path) -> None:
    paths = make_synthetic(str(tmp_path), seed=0, n_train=30, n_test=9, image_size=40)
    assert pq.read_schema(paths["train"]).equals(RL_SCHEMA)
    examples, report = load_examples([paths["train"], paths["test"]])
    assert (report.rows, report.loaded, report.skipped) == (39, 39, 0)
    assert {e.task for e in examples} == set(TASKS)
    assert [e.row for e in examples[:30]] == list(range(30))
    for e in examples:
        assert len(e.negatives) == 1
        sides = [e.query, e.positive, *e.negatives]
        images = [img for s in sides for img in s.images]
        assert images, "every task has an image on some side"
        for ref in images:
            assert isinstance(ref, ImageRef)  # loading keeps references; pixels are decoded per batch
            img = decode_image(ref, MediaLimits())
            assert img.mode == "RGB" and img.size == (40, 40)
        if e.task == "retrieval":
            assert e.query.text and not e.query.images
            assert e.positive.images and e.negatives[0].images
        else:
            assert e.query.images and e.positive.text and e.negatives[0].text
            assert e.positive.text != e.negatives[0].text


def _png(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGBA") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (10, 20, 30, 255) if mode == "RGBA" else 7).save(path)


def _mmeb(path: Path, rows: list[dict[str, str | None]]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _mmeb_row(**over: str | None) -> dict[str, str | None]:
    row = {
        "qry": "<|image_1|>\nRepresent the given image.",
        "qry_image_path": "imgs/q.png",
        "pos_text": "a cat",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": None,
    }
    return row | over


def test_mmeb_rows_load(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "q.png")
    _png(tmp_path / "imgs" / "n.png", mode="L")
    path = _mmeb(
        tmp_path / "train.parquet",
        [_mmeb_row(), _mmeb_row(neg_text="a dog <|image_1|>", neg_image_path="imgs/n.png")],
    )
    examples, report = load_examples(path)
    assert (report.rows, report.loaded, report.skipped) == (2, 2, 0)
    first, second = examples
    assert first.task == "mmeb" and first.row == 0
    assert first.query.text == "Represent the given image."
    query_image = decode_image(first.query.images[0], MediaLimits())
    assert query_image.mode == "RGB" and query_image.size == (8, 6)
    assert first.positive.text == "a cat" and first.positive.images == []
    assert first.negatives == []
    assert second.negatives[0].text == "a dog"
    assert decode_image(second.negatives[0].images[0], MediaLimits()).mode == "RGB"  # from L


def test_mmeb_without_negative_columns_and_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "media" / "imgs" / "q.png")
    row = _mmeb_row()
    del row["neg_text"], row["neg_image_path"]
    path = _mmeb(tmp_path / "train.parquet", [row])
    examples, _ = load_examples([path], image_root=str(tmp_path / "media"))
    assert examples[0].negatives == [] and len(examples[0].query.images) == 1


def test_missing_image_raises_naming_file_and_row(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "q.png")
    path = _mmeb(tmp_path / "train.parquet", [_mmeb_row(), _mmeb_row(pos_image_path="imgs/cat.png")])
    with pytest.raises(BadRowError) as err:
        load_examples(path)
    message = str(err.value)
    assert path in message and "row 1" in message and "positive" in message
    assert "imgs/cat.png" in message and "not found" in message


def test_skip_counts_bad_rows(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "q.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png at all")  # found when decoded: test_row_batches
    rows = [
        _mmeb_row(),
        _mmeb_row(qry_image_path="imgs/missing.png"),
        _mmeb_row(neg_image_path="imgs/bad.png"),
        _mmeb_row(pos_text=""),
        _mmeb_row(pos_image_path="imgs"),
    ]
    path = _mmeb(tmp_path / "train.parquet", rows)
    examples, report = load_examples(path, on_bad_row="skip")
    assert [e.row for e in examples] == [0, 2]
    assert examples[1].where == f"{path} row 2"
    assert (report.rows, report.loaded, report.skipped) == (5, 2, 3)
    assert "row 1" in report.reasons[0] and "missing.png" in report.reasons[0]
    assert "row 3" in report.reasons[1] and "positive side is empty" in report.reasons[1]
    assert "row 4" in report.reasons[2] and "'imgs'" in report.reasons[2]
    assert "is a directory, not an image file" in report.reasons[2]


def test_native_empty_side_and_path_images(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    side = {"text": "", "images": [{"bytes": None, "path": "a.png"}], "video": []}
    frames = {"text": "", "images": [], "video": [{"bytes": None, "path": "a.png"}] * 3}
    empty = {"text": "", "images": [], "video": []}
    rows = [
        {"query": side, "positive": frames, "negatives": [], "task": "retrieval"},
        {"query": side, "positive": frames, "negatives": [empty], "task": "retrieval"},
    ]
    path = tmp_path / "native.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=RL_SCHEMA), path)
    examples, report = load_examples(str(path), on_bad_row="skip")
    assert report.skipped == 1 and "row 1: negatives[0] side is empty" in report.reasons[0]
    assert examples[0].query.video is None and len(examples[0].positive.video or []) == 3
    with pytest.raises(BadRowError, match="row 1: negatives"):
        load_examples(str(path))


def test_unknown_columns_error_names_them(tmp_path: Path) -> None:
    path = str(tmp_path / "odd.parquet")
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), path)
    with pytest.raises(ValueError, match=r"odd\.parquet.*'answer', 'question'"):
        load_examples(path, on_bad_row="skip")


def test_invalid_on_bad_row(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="raise.*skip"):
        load_examples([], on_bad_row="ignore")
