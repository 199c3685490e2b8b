"""RL rows: a query, its positive and optional negatives (DESIGN.md section 7). Two layouts are
detected from the columns:

* native (what `ume_r1.synthetic` writes, `RL_SCHEMA`): ``query``, ``positive`` (side structs),
  optional ``negatives`` (list of side structs) and ``task``. A side struct is
  ``{text: string, images: list<{bytes, path}>, video: list<{bytes, path}>}`` (`ume_r1.data.rows.SIDE`).
* MMEB-train: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` and optionally
  ``neg_text``, ``neg_image_path``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ume_r1.data.files import RowProblem
from ume_r1.data.media import image_ref
from ume_r1.data.rows import SIDE, LoadReport, RowParser, Side, checked_side, load_rows, native_side

NATIVE_COLUMNS = {"query", "positive"}
MMEB_COLUMNS = {"qry", "qry_image_path", "pos_text", "pos_image_path"}
RL_SCHEMA = pa.schema(
    [("query", SIDE), ("positive", SIDE), ("negatives", pa.list_(SIDE)), ("task", pa.string())]
)

# MMEB texts mark the image slot; our template puts media first, so the marker is dropped.
_PLACEHOLDER_RE = re.compile(r"<\|image_\d+\|>\n?")


@dataclass
class Example:
    """A query with its positive and explicit negatives."""

    query: Side
    positive: Side
    negatives: list[Side]
    task: str
    row: int  # row index in its source file
    where: str = ""  # "file line N" / "file row N", for errors found after loading


def _native_row(row: dict[str, Any], root: str, index: int) -> Example:
    negatives = [
        native_side(neg, root, f"negatives[{k}]") for k, neg in enumerate(row.get("negatives") or [])
    ]
    return Example(
        query=native_side(row.get("query"), root, "query"),
        positive=native_side(row.get("positive"), root, "positive"),
        negatives=negatives,
        task=row.get("task") or "retrieval",
        row=index,
    )


def _mmeb_side(text: str | None, image_path: str | None, root: str, name: str) -> Side:
    for key, value in (("text", text), ("image path", image_path)):
        if value is not None and not isinstance(value, str):
            raise RowProblem(f"{name} {key} should be a string, found {type(value).__name__}")
    images = [image_ref(image_path, root, f"{name} image file")] if image_path else []
    return checked_side(Side(text=_PLACEHOLDER_RE.sub("", text or "").strip(), images=images), name)


def _mmeb_row(row: dict[str, Any], root: str, index: int) -> Example:
    query = _mmeb_side(row.get("qry"), row.get("qry_image_path"), root, "query")
    positive = _mmeb_side(row.get("pos_text"), row.get("pos_image_path"), root, "positive")
    neg_text, neg_image = row.get("neg_text"), row.get("neg_image_path")
    # An empty neg_text and neg_image_path means "no explicit negative", not an empty side.
    negatives = [_mmeb_side(neg_text, neg_image, root, "negative")] if neg_text or neg_image else []
    return Example(query=query, positive=positive, negatives=negatives, task="mmeb", row=index)


def _example_parser(path: str, columns: set[str]) -> RowParser[Example]:
    if columns >= NATIVE_COLUMNS:
        return _native_row
    if columns >= MMEB_COLUMNS:
        return _mmeb_row
    raise ValueError(
        f"{path}: unknown column layout; found columns {sorted(columns)}; expected native "
        f"{sorted(NATIVE_COLUMNS)} (+ negatives, task) or MMEB-train {sorted(MMEB_COLUMNS)}"
    )


def load_examples(
    paths: str | Sequence[str],
    image_root: str | None = None,
    on_bad_row: str = "raise",
    progress: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Load examples from one or more parquet, JSON Lines or JSON files.

    Relative image paths resolve against `image_root`, else the file's directory.
    With ``on_bad_row="raise"`` a bad row raises `BadRowError`; with ``"skip"`` it is skipped and
    its message recorded in the report. An unknown column layout is always a ValueError.
    """
    return load_rows(paths, _example_parser, image_root, on_bad_row, progress)
