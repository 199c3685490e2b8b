"""Eval sets: the synthetic eval files and config, and config or row errors named by dataset, file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_eval_config, write_eval_set

from ume_r1.data.rows import BadRowError
from ume_r1.eval.datasets import load_config, load_dataset
from ume_r1.eval.synthetic_config import make_synthetic_eval
from ume_r1.synthetic.shapes import side_struct


def test_synthetic_eval_files(synthetic_dir: dict[str, str], tmp_path: Path) -> None:
    config = make_synthetic_eval(synthetic_dir["test"], str(tmp_path / "eval"))
    specs = load_config(config)
    assert [(s.name, s.meta_task, s.metric) for s in specs] == [
        ("synthetic_classification", "CLS", "hit@1"),
        ("synthetic_vqa", "QA", "hit@1"),
        ("synthetic_retrieval", "RET", "hit@1"),
    ]
    source = pq.read_table(synthetic_dir["test"]).to_pylist()
    for spec in specs:
        task = spec.name.removeprefix("synthetic_")
        src = [r for r in source if r["task"] == task]
        rows = pq.read_table(spec.path).to_pylist()
        positives = {json.dumps(r["positive"], default=str) for r in src}
        assert len(rows) == len(src)
        for r, s in zip(rows, src, strict=True):
            keys = [json.dumps(c, default=str) for c in r["candidates"]]
            assert len(set(keys)) == len(keys)  # identical sides merged
            assert positives <= set(keys)  # every positive of the task is a candidate
            assert all(json.dumps(n, default=str) in keys for n in s["negatives"])
            assert r["labels"] == [keys.index(json.dumps(s["positive"], default=str))]
            assert r["query"] == s["query"]
        assert load_dataset(spec).rows[0].labels == rows[0]["labels"]


def test_config_missing_file_names_dataset(tmp_path: Path) -> None:
    config = write_eval_config(
        tmp_path / "eval.yaml", [{"name": "ds1", "meta_task": "RET", "metric": "hit@1", "path": "no.parquet"}]
    )
    with pytest.raises(FileNotFoundError, match=r"dataset 'ds1' points at missing file 'no.parquet'"):
        load_config(config)
    with pytest.raises(FileNotFoundError, match="eval config"):
        load_config(tmp_path / "absent.yaml")
    bad = write_eval_config(
        tmp_path / "bad.yaml", [{"name": "ds1", "meta_task": "RET", "metric": "recall@3", "path": "x"}]
    )
    with pytest.raises(ValueError, match="recall@3"):
        load_config(bad)


def test_label_outside_candidates_and_empty_labels(tmp_path: Path) -> None:
    good = {"query": side_struct("q"), "candidates": [side_struct("a"), side_struct("b")], "labels": [1]}
    path = write_eval_set(tmp_path / "ds.parquet", [good, {**good, "labels": [0, 5]}])
    config = write_eval_config(
        tmp_path / "eval.yaml", [{"name": "ds", "meta_task": "RET", "metric": "hit@1", "path": "ds.parquet"}]
    )
    (spec,) = load_config(config)
    with pytest.raises(
        BadRowError,
        match=r"dataset 'ds': .*ds.parquet row 1: the candidate list does not contain the label 5",
    ):
        load_dataset(spec)
    write_eval_set(Path(path), [{**good, "labels": []}])
    with pytest.raises(BadRowError, match="row 0: labels is empty"):
        load_dataset(spec)
    write_eval_set(Path(path), [{**good, "labels": [-1]}])
    with pytest.raises(BadRowError, match="does not contain the label -1"):
        load_dataset(spec)
