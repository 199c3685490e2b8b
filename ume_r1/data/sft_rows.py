"""The UME-R1 cold-start SFT row format and its loader (DESIGN.md section 7, paper section 3.3):
parquet, JSON Lines or JSON files (`ume_r1.data.files`).

One row per query / positive pair. Each side is the native side struct of `ume_r1.data.rows`
(``{text, images: list<{bytes, path}>, video: list<{bytes, path}>}``, the content of the human
turn) plus that side's assistant turn, ``<think>{reasoning}</think><answer>{summary}<gen_emb>``:

    query (side struct), query_response (string), positive (side struct),
    positive_response (string), task (string)

The human turn's template is not stored: `ume_r1.data.template.chat_prompt` builds it from the side.

The conversation layout of UME-R1's released SFT data (`UME-sft-train.json`, read by its
Qwen-VL-finetune-style loader) is read too. The paper gives no schema and the public repository holds
only its README, so this is the LLaVA / Qwen-VL conversation convention that README points to, one
object per side:

    {"qry": {"conversations": [{"from": "human", "value": "<image>\nFind the caption."},
                               {"from": "gpt", "value": "<think>..</think><answer>..</answer><gen_emb>"}],
             "image": "imgs/1.jpg"},          # or a list; "video": frame dir, frame list or video file
     "pos": {...}, "task": "..."}             # task optional

`<image>` / `<video>` placeholders are taken out of the human turn (the template puts media first)
and must match the number of images; a human turn that already holds the UME instruction keeps only
what precedes `<disc_emb>`. `human`/`user` and `gpt`/`assistant` are both accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ume_r1.data.media import image_refs, video_ref
from ume_r1.data.rows import SIDE, LoadReport, RowParser, RowProblem, Side, load_rows, native_side
from ume_r1.data.template import DISC_EMB, GEN_EMB, format_ok

SFT_COLUMNS = ("query", "query_response", "positive", "positive_response", "task")
CONVERSATION_COLUMNS = ("qry", "pos")
HUMAN, GPT = ("human", "user"), ("gpt", "assistant")
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
    where: str = ""  # "file line N" / "file row N", for errors found after loading


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


def _conversation_side(value: Any, root: str, name: str) -> tuple[Side, str]:
    """One side of the conversation layout: its `Side` and its assistant turn."""
    if not isinstance(value, dict):
        raise RowProblem(f"{name} should be an object with conversations, found {type(value).__name__}")
    turns = value.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
        raise RowProblem(f"{name}.conversations should be a list of a human turn and a gpt turn")
    (human, gpt) = turns
    if human.get("from") not in HUMAN or gpt.get("from") not in GPT:
        raise RowProblem(
            f"{name}.conversations turns are from {human.get('from')!r}, {gpt.get('from')!r}; "
            f"expected one of {HUMAN} then one of {GPT}"
        )
    text = human.get("value")
    if not isinstance(text, str):
        raise RowProblem(f"{name} human value should be a string, found {type(text).__name__}")
    images = value.get("image", value.get("images"))
    images = image_refs([images] if isinstance(images, str) else images, root, f"{name} image")
    if text.count("<image>") not in (0, len(images)):
        raise RowProblem(f"{name} human turn has {text.count('<image>')} <image> but {len(images)} images")
    text = text.split(DISC_EMB)[0].replace("<image>", "").replace("<video>", "").strip()
    side = Side(text=text, images=images, video=video_ref(value.get("video"), root, f"{name} video"))
    if side.is_empty():
        raise RowProblem(f"{name} side is empty (no text, images or video)")
    return side, check_response(gpt.get("value"), name)


def _conversation_row(row: dict[str, Any], root: str, index: int) -> SFTPair:
    query, query_response = _conversation_side(row.get("qry"), root, "qry")
    positive, positive_response = _conversation_side(row.get("pos"), root, "pos")
    task = row.get("task") or row.get("dataset") or "retrieval"
    return SFTPair(query, query_response, positive, positive_response, str(task), index)


def _sft_parser(path: str, columns: set[str]) -> RowParser[SFTPair]:
    if all(c in columns for c in CONVERSATION_COLUMNS):
        return _conversation_row
    missing = [c for c in SFT_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: not an SFT file; missing columns {missing}; found columns {sorted(columns)}; "
            f"expected {list(SFT_COLUMNS)}, or the conversation layout's {list(CONVERSATION_COLUMNS)}"
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
