"""Row files in the formats users have: parquet, JSON Lines and JSON, read as dict rows; parquet
written atomically.

Every problem is named: a file that is missing, empty, a directory, of an unknown extension or not
what its extension says raises `DataFileError` naming the file; a JSON Lines line that is cut short,
not UTF-8 or not an object becomes a `RowProblem` of that line, which the loader raises or skips
and counts like any other bad row (`data.on_bad_row`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET = (".parquet", ".pq")
JSON_LINES = (".jsonl", ".ndjson")
JSON = (".json",)


class DataFileError(ValueError):
    """A data file that cannot be read at all; the message names the file and what is wrong."""


class RowProblem(Exception):
    """A bad row; the loader adds the file and the row or line to the message."""


class TooLong(RowProblem):
    """A row over a length limit (`data.max_prompt_length`, SFT `data.max_length`); `data.truncation`
    decides whether it is an error, skipped, or cut to fit."""


@dataclass
class RowFile:
    """A readable row file: its columns (of the first row, for JSON formats) and its rows, each with
    where it is (`row 3`, `line 4`) and the row, or the `RowProblem` that stands in for it."""

    path: str
    columns: set[str]
    _rows: Iterator[tuple[str, dict[str, Any] | RowProblem]]

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | RowProblem]]:
        return self._rows


def open_rows(path: str) -> RowFile:
    if os.path.isdir(path):
        raise DataFileError(f"{path}: is a directory, not a data file")
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: the file is empty")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PARQUET:
        return _parquet(path)
    if suffix in JSON_LINES:
        return _json_lines(path)
    if suffix in JSON:
        return _json(path)
    raise DataFileError(
        f"{path}: unknown extension {suffix or '(none)'!r}; expected parquet {PARQUET}, "
        f"JSON Lines {JSON_LINES} or JSON {JSON}"
    )


def _parquet(path: str) -> RowFile:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"{path}: not a readable parquet file ({e})") from None

    def rows():
        index = 0
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"row {index}", row
                index += 1

    return RowFile(path, set(parquet.schema_arrow.names), rows())


def _json_lines(path: str) -> RowFile:
    def rows():
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    yield f"line {number}", _json_line(raw)

    first = next((row for _, row in rows() if isinstance(row, dict)), None)
    if first is None:
        raise DataFileError(f"{path}: no line holds a JSON object")
    return RowFile(path, set(first), rows())


def _json_line(raw: bytes) -> dict[str, Any] | RowProblem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowProblem(f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
    text = text.strip()
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return RowProblem(f"not valid JSON ({e.msg} at column {e.pos + 1}): {text[:60]!r}")
    if not isinstance(row, dict):
        return RowProblem(f"a JSON {type(row).__name__}, not an object")
    return row


def _json(path: str) -> RowFile:
    """A JSON file holding a list of row objects."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of row objects, found a {type(data).__name__}")
    rows = [
        (
            f"row {i}",
            row if isinstance(row, dict) else RowProblem(f"a JSON {type(row).__name__}, not an object"),
        )
        for i, row in enumerate(data)
    ]
    first = next((row for _, row in rows if isinstance(row, dict)), None)
    if first is None:
        raise DataFileError(f"{path}: the list holds no row object")
    return RowFile(path, set(first), iter(rows))


def write_atomic(rows: list[dict[str, Any]], path: str, schema: pa.Schema) -> None:
    """Write `rows` to parquet at `path` via a temp name and os.replace."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
