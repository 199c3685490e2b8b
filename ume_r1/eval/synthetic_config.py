"""Eval sets from a synthetic test split (`ume_r1.synthetic`): one eval file per task and the config
that lists them, for the demo, the ablation and the tests."""

from __future__ import annotations

import os
from typing import Any

import pyarrow.parquet as pq
import yaml

from ume_r1.data.files import write_atomic
from ume_r1.eval.datasets import EVAL_SCHEMA
from ume_r1.eval.report import write_text
from ume_r1.synthetic.reasoning import REASONING_TASKS

# Synthetic task -> (MMEB meta-task, metric); MMEB scores image tasks with Hit@1. The reasoning tasks
# are questions about an image: MMEB's VQA meta-task.
SYNTHETIC_TASKS = {
    "classification": ("CLS", "hit@1"),
    "vqa": ("QA", "hit@1"),
    "retrieval": ("RET", "hit@1"),
    **{task: ("QA", "hit@1") for task in REASONING_TASKS},
}


def _struct_key(side: dict[str, Any]) -> tuple:
    media = tuple(
        (kind, bytes(m.get("bytes") or b""), m.get("path"))
        for kind in ("images", "video")
        for m in side.get(kind) or []
    )
    return (side.get("text") or "", media)


def make_synthetic_eval(test_path: str, out_dir: str) -> str:
    """Turn a synthetic test split (`ume_r1.synthetic` rows) into one eval file per task and a config.

    Each query's candidates are all distinct positives of its task plus its own explicit negatives
    (identical sides merged); its label is the index of its positive. Returns the config path.
    """
    rows = pq.read_table(test_path).to_pylist()
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for task, (meta_task, metric) in SYNTHETIC_TASKS.items():
        task_rows = [r for r in rows if (r.get("task") or "retrieval") == task]
        if not task_rows:
            continue
        pool: dict[tuple, int] = {}
        sides: list[dict[str, Any]] = []
        for r in task_rows:
            if _struct_key(r["positive"]) not in pool:
                pool[_struct_key(r["positive"])] = len(sides)
                sides.append(r["positive"])
        out_rows = []
        for r in task_rows:
            index, candidates = dict(pool), list(sides)
            for neg in r.get("negatives") or []:
                if _struct_key(neg) not in index:
                    index[_struct_key(neg)] = len(candidates)
                    candidates.append(neg)
            out_rows.append(
                {"query": r["query"], "candidates": candidates, "labels": [index[_struct_key(r["positive"])]]}
            )
        write_atomic(out_rows, os.path.join(out_dir, f"{task}.parquet"), EVAL_SCHEMA)
        entries.append(
            {"name": f"synthetic_{task}", "meta_task": meta_task, "metric": metric, "path": f"{task}.parquet"}
        )
    if not entries:
        raise ValueError(f"{test_path}: no rows with a task among {list(SYNTHETIC_TASKS)}")
    config = os.path.join(out_dir, "eval.yaml")
    write_text(config, yaml.safe_dump({"datasets": entries}, sort_keys=False))
    return config
