"""Eval sets: the config that lists them and the files that hold them.

Config (YAML or JSON), paths relative to the config file::

    datasets:
      - {name: synthetic_classification, meta_task: CLS, metric: hit@1, path: classification.parquet}

Eval rows (`EVAL_SCHEMA`; parquet, JSON Lines or JSON): ``query`` (a native side struct, as in
`ume_r1.data.rl_rows`), ``candidates`` (list of side structs) and ``labels`` (list of ints, >= 1:
indices of the relevant candidates).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import yaml

from ume_r1.data.media import MediaLimits, decode_image, decode_video
from ume_r1.data.rows import SIDE, BadRowError, RowParser, RowProblem, Side, load_rows, native_side
from ume_r1.eval.metrics import METRICS

EVAL_SCHEMA = pa.schema([("query", SIDE), ("candidates", pa.list_(SIDE)), ("labels", pa.list_(pa.int32()))])
EVAL_COLUMNS = {"query", "candidates", "labels"}


@dataclass
class DatasetSpec:
    """One config entry; `path` is resolved against the config file's directory."""

    name: str
    meta_task: str
    metric: str
    path: str


@dataclass
class EvalRow:
    query: Side
    candidates: list[Side]
    labels: list[int]
    where: str = ""  # "file row N", for media that fail when decoded


@dataclass
class EvalDataset:
    spec: DatasetSpec
    rows: list[EvalRow]


@dataclass
class SideTable:
    """Distinct sides over all datasets, so a candidate shared by many queries is embedded once."""

    sides: list[Side] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def add(self, side: Side) -> int:
        """The side's row in the table, appending it when new."""
        key = side_key(side)
        if key not in self.index:
            self.index[key] = len(self.sides)
            self.sides.append(side)
        return self.index[key]


def side_key(side: Side) -> str:
    """Content hash of a side: same text and same pixels means the same prompt."""
    h = hashlib.sha1(f"{len(side.text)}:{side.text}".encode())
    limits = MediaLimits()
    images = [decode_image(image, limits) for image in side.images]
    for tag, frames in (("image", images), ("video", decode_video(side.video, limits) if side.video else [])):
        for img in frames:
            h.update(f"|{tag}:{img.mode}:{img.size}|".encode())
            h.update(img.tobytes())
    return h.hexdigest()


def load_config(path: str | os.PathLike) -> list[DatasetSpec]:
    """Parse and check the dataset list; every parquet file must exist."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval config '{path}' not found")
    with open(path) as f:
        raw = yaml.safe_load(f)  # YAML is a superset of JSON, so .json configs load too
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if not entries:
        raise ValueError(f"{path}: expected a top-level 'datasets' list with at least one entry")
    root = os.path.dirname(os.path.abspath(path))
    specs: list[DatasetSpec] = []
    for k, entry in enumerate(entries):
        missing = [key for key in ("name", "meta_task", "metric", "path") if not (entry or {}).get(key)]
        if missing:
            raise ValueError(f"{path}: datasets[{k}] lacks {missing}")
        name = str(entry["name"])
        if entry["metric"] not in METRICS:
            raise ValueError(
                f"{path}: dataset '{name}' has metric {entry['metric']!r}; expected one of {METRICS}"
            )
        full = entry["path"] if os.path.isabs(entry["path"]) else os.path.join(root, entry["path"])
        if not os.path.isfile(full):
            raise FileNotFoundError(
                f"{path}: dataset '{name}' points at missing file '{entry['path']}' (resolved to '{full}')"
            )
        if any(s.name == name for s in specs):
            raise ValueError(f"{path}: dataset name '{name}' appears twice")
        specs.append(DatasetSpec(name, str(entry["meta_task"]), entry["metric"], full))
    return specs


def _eval_row(row: dict[str, Any], root: str, index: int) -> EvalRow:
    candidates = row.get("candidates") or []
    labels = list(dict.fromkeys(row.get("labels") or []))  # a repeated label counts once (as VLM2Vec)
    if not candidates:
        raise RowProblem("the candidate list is empty")
    if not labels:
        raise RowProblem("labels is empty: each query needs at least one relevant candidate")
    outside = [label for label in labels if not 0 <= label < len(candidates)]
    if outside:
        raise RowProblem(
            f"the candidate list does not contain the label {outside[0]} "
            f"(labels {labels}; {len(candidates)} candidates, indices 0..{len(candidates) - 1})"
        )
    return EvalRow(
        query=native_side(row.get("query"), root, "query"),
        candidates=[native_side(c, root, f"candidates[{k}]") for k, c in enumerate(candidates)],
        labels=labels,
    )


def _eval_parser(path: str, columns: set[str]) -> RowParser[EvalRow]:
    if not columns >= EVAL_COLUMNS:
        raise ValueError(f"{path}: eval files need columns {sorted(EVAL_COLUMNS)}; found {sorted(columns)}")
    return _eval_row


def load_dataset(spec: DatasetSpec, max_queries: int | None = None) -> EvalDataset:
    """Read a dataset's rows (the first `max_queries` when given); a bad row raises naming file and row."""
    try:
        rows, _ = load_rows(spec.path, _eval_parser)
    except BadRowError as e:
        raise BadRowError(f"dataset '{spec.name}': {e}") from e
    if not rows:
        raise ValueError(f"dataset '{spec.name}': {spec.path} has no rows")
    return EvalDataset(spec, rows[:max_queries] if max_queries else rows)
