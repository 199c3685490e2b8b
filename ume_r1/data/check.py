"""`python -m ume_r1.data check FILES...`: read data files as training would, and report what is in
them and every bad row, before hours of compute depend on them.

Per file: rows, loaded and bad rows, images and videos, and length percentiles. Lengths are
prompt tokens (and, for SFT rows, response tokens) when `--model` names a checkpoint whose
processor to use, else characters of text; with `--model` every image is decoded too, so media that
only fail when decoded are found. Exit status 1 when any file or row is bad.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ume_r1.data.files import DataFileError, RowProblem, TooLong, open_rows
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.data.sft_rows import CONVERSATION_COLUMNS, load_sft_pairs

PERCENTILES = (50, 90, 99, 100)


def side_media(side: Side) -> tuple[int, int]:
    return len(side.images), int(bool(side.video))


def percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    return " ".join(f"p{q}={int(np.percentile(values, q))}" for q in PERCENTILES)


def check_file(path: str, kind: str, args: argparse.Namespace, processor) -> bool:
    """Print one file's summary and bad rows; returns whether it is clean."""
    load = load_sft_pairs if kind == "sft" else load_examples
    try:
        items, report = load(path, args.image_root, "skip", progress=True)
    except (DataFileError, ValueError) as e:  # the file as a whole: unreadable, unknown layout
        print(f"{path}: ERROR {e}")
        return False
    sides, prompt_lengths, reasons = [], [], list(report.reasons)
    for item in items:
        try:
            lengths = [_length(s, processor) for s in _sides(item, kind)]
        except RowProblem as e:  # media that fail only when decoded
            reasons.append(f"{item.where}: {e}")
            continue
        sides += _sides(item, kind)
        prompt_lengths += lengths
    images, videos = (
        (sum(counts) for counts in zip(*map(side_media, sides), strict=True)) if sides else (0, 0)
    )
    unit = "tokens" if processor is not None else "chars"
    print(
        f"{path}: {report.rows} rows, {report.rows - len(reasons)} loaded, {len(reasons)} bad; "
        f"{len(sides)} sides, {images} images, {videos} videos"
    )
    print(f"  prompt {unit}: {percentiles(prompt_lengths)}")
    if kind == "sft":
        responses = [r for item in items for r in (item.query_response, item.positive_response)]
        count = (lambda r: len(processor.tokenizer(r)["input_ids"])) if processor is not None else len
        print(f"  response {unit}: {percentiles([count(r) for r in responses])}")
    for reason in reasons[: args.limit]:
        print(f"  bad: {reason}")
    if len(reasons) > args.limit:
        print(f"  ... and {len(reasons) - args.limit} more bad rows (--limit)")
    return not reasons


def _sides(item, kind: str) -> list[Side]:
    return [item.query, item.positive] if kind == "sft" else [item.query, item.positive, *item.negatives]


def _length(side: Side, processor) -> int:
    if processor is None:
        return len(side.text)
    try:
        return len(processor.encode(side).input_ids)
    except TooLong:  # over the processor's prompt limit: count it anyway
        return processor.max_prompt_length + 1


def _kind(path: str) -> str:
    """`sft` for SFT rows (they carry responses), else `rl`, judged from the file's columns."""
    columns = open_rows(path).columns
    return "sft" if "query_response" in columns or set(CONVERSATION_COLUMNS) <= columns else "rl"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ume_r1.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="report rows, media, lengths and bad rows of data files")
    check.add_argument("files", nargs="+")
    check.add_argument("--kind", choices=("auto", "rl", "sft"), default="auto")
    check.add_argument("--model", help="a checkpoint: lengths in its tokens (image tokens included)")
    check.add_argument(
        "--image-root", help="where relative image paths resolve (default: each file's directory)"
    )
    check.add_argument("--limit", type=int, default=20, help="bad rows shown per file")
    check.add_argument("--max-prompt-length", type=int, default=1 << 30)
    args = parser.parse_args(argv)

    processor = None
    if args.model:
        from ume_r1.data.processor import UMEProcessor

        processor = UMEProcessor.from_pretrained(args.model, args.max_prompt_length)
    clean = True
    for path in args.files:
        try:
            kind = _kind(path) if args.kind == "auto" else args.kind
        except DataFileError as e:
            print(f"{path}: ERROR {e}")
            clean = False
            continue
        clean &= check_file(path, kind, args, processor)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
