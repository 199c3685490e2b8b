"""Tests for the SFT row format (ume_r1.data.sft_rows) and the synthetic CoT SFT set
(ume_r1.synthetic.shapes_sft)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ume_r1.data.media import MediaLimits, decode_image
from ume_r1.data.rows import BadRowError
from ume_r1.data.sft_rows import SFT_SCHEMA, SFTPair, load_sft_pairs
from ume_r1.data.template import format_ok
from ume_r1.synthetic.shapes import TASKS
from ume_r1.synthetic.shapes_sft import make_synthetic_sft

SUMMARY_RE = re.compile(r"<answer>(.*?)<gen_emb>", re.DOTALL)


def _summary(response: str) -> str:
    match = SUMMARY_RE.search(response)
    assert match, response
    return match.group(1)


@pytest.fixture(scope="module")
def sft_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_synthetic_sft(
        str(tmp_path_factory.mktemp("sft")), seed=0, n_train=30, n_test=9, image_size=40
    )


def _rows(path: str) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = SFT_SCHEMA) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def test_synthetic_sft_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_sft(str(tmp_path / "a"), seed=3, n_train=12, n_test=6)
    b = make_synthetic_sft(str(tmp_path / "b"), seed=3, n_train=12, n_test=6)
    c = make_synthetic_sft(str(tmp_path / "c"), seed=4, n_train=12, n_test=6)
    for split in ("train", "test"):
        assert Path(a[split]).read_bytes() == Path(b[split]).read_bytes()
        assert Path(a[split]).read_bytes() != Path(c[split]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sft_test.parquet", "sft_train.parquet"]


def test_synthetic_sft_responses(sft_paths: dict[str, str]) -> None:
    rows = _rows(sft_paths["train"]) + _rows(sft_paths["test"])
    assert pq.read_schema(sft_paths["train"]).equals(SFT_SCHEMA)
    assert {r["task"] for r in rows} == set(TASKS)
    wordings = set()
    for r in rows:
        for side in ("query", "positive"):
            response = r[f"{side}_response"]
            assert format_ok(response), response
            assert len(response.split()) <= 30, response
            wordings.add(re.sub(r"<answer>.*", "", response))
        # Matching sides share the summary, so the generative embeddings can agree.
        summary = _summary(r["query_response"])
        assert summary == _summary(r["positive_response"])
        if r["task"] == "retrieval":
            assert summary == r["query"]["text"] and r["positive"]["images"]
        else:
            assert summary == r["positive"]["text"] and r["query"]["images"]
    assert len(wordings) > len(rows) // 2, "reasoning wording varies"


def test_synthetic_sft_loads_back(sft_paths: dict[str, str]) -> None:
    pairs, report = load_sft_pairs([sft_paths["train"], sft_paths["test"]])
    assert (report.rows, report.loaded, report.skipped) == (39, 39, 0)
    assert all(isinstance(p, SFTPair) for p in pairs)
    assert [p.row for p in pairs[:30]] == list(range(30))
    assert {p.task for p in pairs} == set(TASKS)
    for p in pairs:
        image_side = p.positive if p.task == "retrieval" else p.query
        text_side = p.query if p.task == "retrieval" else p.positive
        image = decode_image(image_side.images[0], MediaLimits())
        assert len(image_side.images) == 1 and image.size == (40, 40) and image.mode == "RGB"
        assert text_side.text and not text_side.images
        assert format_ok(p.query_response) and format_ok(p.positive_response)


@pytest.mark.parametrize(
    ("column", "response", "needle"),
    [
        ("query_response", "<think>a</think><answer>a red circle", "query_response lacks <gen_emb>"),
        ("positive_response", "<answer>red<gen_emb>", "positive_response lacks <think>"),
        ("query_response", "a red circle", "query_response lacks <think> and <gen_emb>"),
        ("positive_response", "<gen_emb><think>x</think><answer>y", "positive_response does not match"),
        ("query_response", "", "query_response is missing or empty"),
    ],
)
def test_bad_response_raises_naming_file_and_row(
    sft_paths: dict[str, str], tmp_path: Path, column: str, response: str, needle: str
) -> None:
    rows = _rows(sft_paths["test"])[:3]
    rows[1][column] = response
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(BadRowError, match=re.escape(f"{path} row 1: {needle}")):
        load_sft_pairs(path)


def test_missing_media_and_empty_side(sft_paths: dict[str, str], tmp_path: Path) -> None:
    rows = _rows(sft_paths["test"])[:6]
    retrieval_row = next(i for i, r in enumerate(rows) if r["task"] == "retrieval")
    rows[retrieval_row]["positive"]["images"] = [{"bytes": None, "path": "imgs/missing.png"}]
    rows[5]["query"] = {"text": "", "images": [], "video": []}
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(
        BadRowError, match=rf"{re.escape(path)} row {retrieval_row}: positive image 0 .*not found"
    ):
        load_sft_pairs(path)

    pairs, report = load_sft_pairs(path, on_bad_row="skip")
    bad = sorted({retrieval_row, 5})
    assert (report.rows, report.loaded, report.skipped) == (6, 4, 2)
    assert sorted(set(range(6)) - {p.row for p in pairs}) == bad
    reasons = dict(zip(bad, report.reasons, strict=True))  # reasons come in row order
    assert "imgs/missing.png" in reasons[retrieval_row] and "not found" in reasons[retrieval_row]
    assert reasons[5] == f"{path} row 5: query side is empty (no text, images or video)"


def test_skip_counts_bad_responses(sft_paths: dict[str, str], tmp_path: Path) -> None:
    rows = _rows(sft_paths["test"])[:4]
    rows[0]["query_response"] = rows[0]["query_response"].replace("<gen_emb>", "")
    rows[2]["positive_response"] = rows[2]["positive_response"].replace("<think>", "")
    path = _write(tmp_path / "bad.parquet", rows)
    pairs, report = load_sft_pairs(path, on_bad_row="skip")
    assert [p.row for p in pairs] == [1, 3]
    assert (report.rows, report.loaded, report.skipped) == (4, 2, 2)
    assert "row 0: query_response lacks <gen_emb>" in report.reasons[0]
    assert "row 2: positive_response lacks <think>" in report.reasons[1]


def test_missing_column_names_file_and_columns(sft_paths: dict[str, str], tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "positive_response"} for r in _rows(sft_paths["test"])[:2]]
    path = _write(tmp_path / "cols.parquet", rows, schema=None)
    with pytest.raises(ValueError, match=re.escape(path)) as info:
        load_sft_pairs(path)
    message = str(info.value)
    assert "missing columns ['positive_response']" in message
    assert "found columns ['positive', 'query', 'query_response', 'task']" in message
    # An RL-layout file is not SFT data either.
    with pytest.raises(ValueError, match="missing columns"):
        load_sft_pairs(_write(tmp_path / "rl.parquet", [{"query": "q", "positive": "p"}], schema=None))
