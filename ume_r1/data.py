"""Data schema and loaders for query / positive / negative rows (DESIGN.md section 7), from parquet,
JSON Lines or JSON files (`ume_r1.data_files`).

Two row layouts are detected from the columns:

* native (what `ume_r1.synthetic` writes): ``query``, ``positive`` (side structs), optional
  ``negatives`` (list of side structs) and ``task``. A side struct is
  ``{text: string, images: list<{bytes, path}>, video: list<{bytes, path}>}``.
* MMEB-train: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` and optionally
  ``neg_text``, ``neg_image_path``.

Loading keeps media as references (`ume_r1.media`) and checks only what is cheap: a row's pixels are
decoded when its batch is encoded (`ume_r1.row_batches`), so a data set of any size loads in memory
proportional to its rows' text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from ume_r1.data_files import RowProblem, open_rows
from ume_r1.media import Media, Video, image_ref, image_refs, video_ref

ON_BAD_ROW = ("raise", "skip")
NATIVE_COLUMNS = {"query", "positive"}
MMEB_COLUMNS = {"qry", "qry_image_path", "pos_text", "pos_image_path"}
# MMEB texts mark the image slot; our template puts media first, so the marker is dropped.
_PLACEHOLDER_RE = re.compile(r"<\|image_\d+\|>\n?")
T = TypeVar("T")


@dataclass
class Side:
    """One side of a pair: the query, the positive target, or a negative target."""

    text: str
    images: list[Media] = field(default_factory=list)  # decoded, or references decoded per batch
    video: Video | None = None  # frames in order, or a video file

    def is_empty(self) -> bool:
        return not self.text and not self.images and not self.video


@dataclass
class Example:
    """A query with its positive and explicit negatives."""

    query: Side
    positive: Side
    negatives: list[Side]
    task: str
    row: int  # row index in its source file
    where: str = ""  # "file line N" / "file row N", for errors found after loading


@dataclass
class LoadReport:
    """Counts from one `load_examples` call; `reasons` holds one message per skipped row."""

    rows: int
    loaded: int
    skipped: int
    reasons: list[str] = field(default_factory=list)


class BadRowError(ValueError):
    """A row that cannot be loaded; the message names the file, the row and the key or file at fault."""


def _checked(side: Side, name: str) -> Side:
    if side.is_empty():
        raise RowProblem(f"{name} side is empty (no text, images or video)")
    return side


def native_side(value: dict[str, Any] | None, root: str, name: str) -> Side:
    """Parse one native side struct into a `Side`; raises `RowProblem` naming `name` when bad or empty."""
    value = value or {}
    if not isinstance(value, dict):
        raise RowProblem(f"{name} should be an object with text, images, video; found {type(value).__name__}")
    if not isinstance(value.get("text") or "", str):
        raise RowProblem(f"{name} text should be a string, found {type(value['text']).__name__}")
    side = Side(
        text=value.get("text") or "",
        images=image_refs(value.get("images"), root, f"{name} image"),
        video=video_ref(value.get("video"), root, f"{name} video"),
    )
    return _checked(side, name)


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
    return _checked(Side(text=_PLACEHOLDER_RE.sub("", text or "").strip(), images=images), name)


def _mmeb_row(row: dict[str, Any], root: str, index: int) -> Example:
    query = _mmeb_side(row.get("qry"), row.get("qry_image_path"), root, "query")
    positive = _mmeb_side(row.get("pos_text"), row.get("pos_image_path"), root, "positive")
    neg_text, neg_image = row.get("neg_text"), row.get("neg_image_path")
    # An empty neg_text and neg_image_path means "no explicit negative", not an empty side.
    negatives = [_mmeb_side(neg_text, neg_image, root, "negative")] if neg_text or neg_image else []
    return Example(query=query, positive=positive, negatives=negatives, task="mmeb", row=index)


RowParser = Callable[[dict[str, Any], str, int], T]


def load_rows(
    paths: str | Sequence[str],
    pick_parser: Callable[[str, set[str]], RowParser[T]],
    image_root: str | None = None,
    on_bad_row: str = "raise",
    progress: bool = False,
) -> tuple[list[T], LoadReport]:
    """Parse every row of one or more row files (parquet, JSON Lines, JSON) with the parser
    `pick_parser(path, columns)` returns.

    The parser gets ``(row, image_root, index)`` and raises `RowProblem` for a bad row; `pick_parser`
    raises ValueError for a column layout it does not know. Relative image paths resolve against
    `image_root`, else the file's directory. With ``on_bad_row="raise"`` a bad row raises
    `BadRowError` naming file and row (or line); with ``"skip"`` it is skipped and its message
    recorded. A file that cannot be read at all raises `DataFileError`. `progress`: a bar per file.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
    paths = [paths] if isinstance(paths, str) else list(paths)
    items: list[T] = []
    report = LoadReport(rows=0, loaded=0, skipped=0)
    for path in paths:
        rows = open_rows(path)
        parse = pick_parser(path, rows.columns)
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        for index, (where, row) in enumerate(tqdm(rows, desc=path, unit="row", disable=not progress)):
            report.rows += 1
            try:
                if isinstance(row, RowProblem):  # a line that is no row at all
                    raise row
                item = parse(row, root, index)
                item.where = f"{path} {where}"
                items.append(item)
                report.loaded += 1
            except RowProblem as e:
                message = f"{path} {where}: {e}"
                if on_bad_row == "raise":
                    raise BadRowError(message) from e
                report.skipped += 1
                report.reasons.append(message)
    return items, report


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


if __name__ == "__main__":  # python -m ume_r1.data check FILES...
    import sys

    from ume_r1.data_check import main

    sys.exit(main())
