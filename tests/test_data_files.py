"""Row files in every format (parquet, JSON Lines, JSON) load to the same examples, and every kind of
bad input is named (file and row or line), or skipped and counted where a row can be skipped."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FORMATS, jsonable, write_rows

from ume_r1.data.files import DataFileError
from ume_r1.data.media import MediaLimits, decode_image
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import BadRowError
from ume_r1.data.sft_rows import load_sft_pairs


@pytest.fixture(scope="module")
def rows(synthetic_dir) -> list[dict]:
    return pq.read_table(synthetic_dir["train"]).slice(0, 6).to_pylist()


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_every_format_loads_the_same_examples(rows, tmp_path, fmt):
    want, _ = load_examples(str(write_rows(rows, tmp_path / "rows", "parquet")))
    got, report = load_examples(str(write_rows(rows, tmp_path / "rows", fmt)))
    assert (report.rows, report.loaded) == (6, 6)
    for a, b in zip(want, got, strict=True):
        assert (a.query.text, a.positive.text, a.task, a.row) == (
            b.query.text,
            b.positive.text,
            b.task,
            b.row,
        )
        for side_a, side_b in ((a.query, b.query), (a.positive, b.positive)):
            pixels = [decode_image(i, MediaLimits()).tobytes() for i in side_a.images]
            assert pixels == [decode_image(i, MediaLimits()).tobytes() for i in side_b.images]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_value_of_the_wrong_type_is_a_named_bad_row(rows, tmp_path, fmt):
    bad = [dict(r) for r in rows]
    bad[2]["query"] = "a string where a side object belongs"
    schema = pa.schema([("query", pa.string()), ("positive", pa.string())]) if fmt == "parquet" else None
    if schema is not None:  # a parquet column has one type: the whole column is wrong
        bad = [{"query": "text", "positive": "text"}] * 3
    path = write_rows(bad, tmp_path / "rows", fmt, schema)
    where = "row 0" if fmt == "parquet" else ("line 3" if fmt == "jsonl" else "row 2")
    with pytest.raises(BadRowError, match=rf"rows\.{fmt} {where}: query should be an object"):
        load_examples(str(path))
    loaded, report = load_examples(str(path), on_bad_row="skip")
    assert report.skipped == (3 if fmt == "parquet" else 1) and len(loaded) == report.rows - report.skipped


def test_jsonl_lines_cut_short_or_not_utf8_are_named_or_skipped(rows, tmp_path):
    lines = [json.dumps(jsonable(r)) for r in rows]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        "\n".join([lines[0], lines[1][:50], "", lines[2]]).encode()
        + b'\n{"query": "caf\xe9"}\n'
        + b"[1, 2]\n"
    )
    cut_short = r"rows\.jsonl line 2: not valid JSON \(Expecting value at column 50\)"
    with pytest.raises(BadRowError, match=cut_short):
        load_examples(str(path))
    loaded, report = load_examples(str(path), on_bad_row="skip")
    assert len(loaded) == 2 and report.skipped == 3
    assert [r.split(": ", 1)[0].split()[-2:] for r in report.reasons] == [
        ["line", "2"],
        ["line", "5"],
        ["line", "6"],
    ]
    assert "not UTF-8 (byte 0xe9 at column 15)" in report.reasons[1]
    assert "a JSON list, not an object" in report.reasons[2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_that_cannot_be_read_are_named(tmp_path, fmt):
    empty = tmp_path / f"empty.{fmt}"
    empty.touch()
    with pytest.raises(DataFileError, match=rf"empty\.{fmt}: the file is empty"):
        load_examples(str(empty), on_bad_row="skip")
    garbage = tmp_path / f"garbage.{fmt}"
    garbage.write_bytes(b"\xff\xfe not what the name says")
    if fmt == "jsonl":  # line by line: the file opens, its one line is a bad row
        with pytest.raises(DataFileError, match="no line holds a JSON object"):
            load_examples(str(garbage))
    else:
        with pytest.raises(DataFileError, match=rf"garbage\.{fmt}: not"):
            load_examples(str(garbage))


def test_missing_file_directory_and_unknown_extension_are_named(tmp_path):
    with pytest.raises(DataFileError, match=r"nope\.parquet: no such file"):
        load_examples(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataFileError, match="is a directory, not a data file"):
        load_examples(str(tmp_path))
    (tmp_path / "rows.csv").write_text("query,positive\n")
    with pytest.raises(DataFileError, match=r"unknown extension '\.csv'; expected parquet"):
        load_examples(str(tmp_path / "rows.csv"))
    (tmp_path / "list.json").write_text('{"query": {}}')
    with pytest.raises(DataFileError, match="expected a JSON list of row objects, found a dict"):
        load_examples(str(tmp_path / "list.json"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_columns_and_media_faults_are_named(rows, tmp_path, fmt):
    no_positive = [{k: v for k, v in r.items() if k != "positive"} for r in rows]
    with pytest.raises(ValueError, match="unknown column layout"):
        load_examples(str(write_rows(no_positive, tmp_path / "cols", fmt)))
    (tmp_path / "a_dir.png").mkdir()
    bad = [dict(r) for r in rows]
    bad[1]["query"] = {"text": "x", "images": [{"bytes": None, "path": "a_dir.png"}], "video": []}
    bad[3]["positive"] = {"text": "y", "images": [{"bytes": None, "path": None}], "video": []}
    path = write_rows(bad, tmp_path / "rows", fmt)
    with pytest.raises(BadRowError, match="query image 0 'a_dir.png'.* is a directory, not an image file"):
        load_examples(str(path))
    _, report = load_examples(str(path), on_bad_row="skip")
    assert report.skipped == 2 and "positive image 0 has neither bytes nor path" in report.reasons[1]
    if fmt != "parquet":
        bad[3]["positive"]["images"][0]["bytes"] = "@@ not base64 @@"
        with pytest.raises(BadRowError, match="positive image 0 bytes are a string but not base64"):
            load_examples(str(write_rows(bad[2:], tmp_path / "b64", fmt)))


def test_sft_rows_load_from_jsonl(sft_dir, tmp_path):
    table = pq.read_table(sft_dir["train"]).slice(0, 4).to_pylist()
    want, _ = load_sft_pairs(sft_dir["train"])
    got, report = load_sft_pairs(str(write_rows(table, tmp_path / "sft", "jsonl")))
    assert report.loaded == 4
    assert [(p.query.text, p.query_response) for p in got] == [
        (p.query.text, p.query_response) for p in want[:4]
    ]


def test_data_check_cli_reports_rows_media_lengths_and_bad_rows(rows, tiny_model_dir, tmp_path, capsys):
    from ume_r1.data.check import main

    good = write_rows(rows, tmp_path / "good", "parquet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(jsonable(rows[0])) + "\n{cut short\n" + json.dumps({"query": 3, "positive": {}}) + "\n"
    )
    (tmp_path / "x.csv").write_text("query,positive\n")
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert f"{good}: 6 rows, 6 loaded, 0 bad; 18 sides," in out and "prompt chars: p50=" in out

    assert (
        main(
            ["check", str(good), str(bad), str(tmp_path / "x.csv"), "--model", tiny_model_dir, "--limit", "1"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"{bad}: 3 rows, 1 loaded, 2 bad;" in out and "prompt tokens: p50=" in out
    assert f"  bad: {bad} line 2: not valid JSON" in out and "... and 1 more bad rows (--limit)" in out
    assert f"{tmp_path / 'x.csv'}: ERROR" in out and "unknown extension" in out


def test_data_check_runs_as_a_module(sft_dir):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ume_r1.data", "check", sft_dir["train"]], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "32 rows, 32 loaded, 0 bad" in result.stdout and "response chars: p50=" in result.stdout
