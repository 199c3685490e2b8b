"""The UME-R1 cold-start SFT row format and its loader (DESIGN.md section 7, paper section 3.3):
parquet, JSON Lines or JSON files (`ume_r1.data_files`).

One row per query / positive pair. Each side is the native side struct of `ume_r1.data`
(``{text, images: list<{bytes, path}>, video: list<{bytes, path}>}``, the content of the human
turn) plus that side's assistant turn, ``<think>{reasoning}</think><answer>{summary}<gen_emb>``:

    query (side struct), query_response (string), positive (side struct),
    positive_response (string), task (string)

The human turn's template is not stored: `ume_r1.template.chat_prompt` builds it from the side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ume_r1.data import LoadReport, RowParser, RowProblem, Side, load_rows, native_side
from ume_r1.synthetic import SIDE
from ume_r1.template import GEN_EMB, format_ok

SFT_COLUMNS = ("query", "query_response", "positive", "positive_response", "task")
SFT_SCHEMA = pa.schema(
    [
        ("query", SIDE),
        ("query_response", pa.string()),
        ("positive", SIDE),
        ("positive_response", pa.string()),
        ("task", pa.string()),
    ]
)


@dataclass
class SFTPair:
    """A query and its positive, each with the assistant turn the model is trained to produce."""

    query: Side
    query_response: str
    positive: Side
    positive_response: str
    task: str
    row: int  # row index in its source file


def check_response(response: Any, name: str) -> str:
    """Return `response` if it is a well-formed assistant turn, else raise `RowProblem` saying why.

    Missing tags are named first because "fails the format" alone does not tell a data author what to fix.
    """
    if not isinstance(response, str) or not response.strip():
        raise RowProblem(f"{name}_response is missing or empty")
    missing = [tag for tag in ("<think>", GEN_EMB) if tag not in response]
    if missing:
        raise RowProblem(f"{name}_response lacks {' and '.join(missing)}: {response[:80]!r}")
    if not format_ok(response):
        raise RowProblem(
            f"{name}_response does not match <think>..</think><answer>..{GEN_EMB}: {response[:80]!r}"
        )
    return response


def _sft_row(row: dict[str, Any], root: str, index: int) -> SFTPair:
    # Responses first: they are cheap to check, so a bad one fails before images are decoded.
    query_response = check_response(row.get("query_response"), "query")
    positive_response = check_response(row.get("positive_response"), "positive")
    return SFTPair(
        query=native_side(row.get("query"), root, "query"),
        query_response=query_response,
        positive=native_side(row.get("positive"), root, "positive"),
        positive_response=positive_response,
        task=row.get("task") or "retrieval",
        row=index,
    )


def _sft_parser(path: str, columns: set[str]) -> RowParser[SFTPair]:
    missing = [c for c in SFT_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: not an SFT file; missing columns {missing}; found columns {sorted(columns)}; "
            f"expected {list(SFT_COLUMNS)}"
        )
    return _sft_row


def load_sft_pairs(
    paths: str | Sequence[str],
    image_root: str | None = None,
    on_bad_row: str = "raise",
    progress: bool = False,
) -> tuple[list[SFTPair], LoadReport]:
    """Load SFT pairs from one or more parquet, JSON Lines or JSON files.

    Relative image paths resolve against `image_root`, else the file's directory. A bad row
    (malformed response, unreadable media, empty side) raises `BadRowError` naming file and row with
    ``on_bad_row="raise"``, or is skipped and counted with ``"skip"``. Missing columns: ValueError.
    """
    return load_rows(paths, _sft_parser, image_root, on_bad_row, progress)
