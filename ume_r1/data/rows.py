"""What every row format shares (DESIGN.md section 7): a `Side` (text and media references) and its
arrow struct, and `load_rows`, which reads parquet, JSON Lines or JSON files (`ume_r1.data.files`) row
by row with a format's parser, raising on a bad row or skipping and counting it. The formats are RL
rows (`ume_r1.data.rl_rows`), SFT pairs (`ume_r1.data.sft_rows`) and eval sets (`ume_r1.eval.datasets`).

Loading keeps media as references (`ume_r1.data.media`) and checks only what is cheap: a row's pixels
are decoded when its batch is encoded (`ume_r1.data.loader`), so a data set of any size loads in
memory proportional to its rows' text.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
from tqdm import tqdm

from ume_r1.data.files import RowProblem, open_rows
from ume_r1.data.media import Media, Video, image_refs, video_ref

ON_BAD_ROW = ("raise", "skip")
# A side as stored in parquet (JSON rows use the same keys; image bytes there are base64).
MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SIDE = pa.struct([("text", pa.string()), ("images", pa.list_(MEDIA)), ("video", pa.list_(MEDIA))])
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
class LoadReport:
    """Counts from one `load_examples` call; `reasons` holds one message per skipped row."""

    rows: int
    loaded: int
    skipped: int
    reasons: list[str] = field(default_factory=list)


class BadRowError(ValueError):
    """A row that cannot be loaded; the message names the file, the row and the key or file at fault."""


def checked_side(side: Side, name: str) -> Side:
    """`side`, or a `RowProblem` naming `name` when it has no text, images or video."""
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
    return checked_side(side, name)


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
