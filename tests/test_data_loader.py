"""Media decoded per batch in data workers (ume_r1.data.loader, ume_r1.data.media): faults found only when
decoding are named or skipped, length limits apply their policy, video comes in every form, and the
UME-R1 conversation layout trains a step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FORMATS, write_rows
from PIL import Image

from sft.step import encode_pair
from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.files import RowProblem, TooLong
from ume_r1.data.loader import BadRowCounts, EncodedRows, row_batches
from ume_r1.data.media import ImageRef, MediaLimits, VideoFile, decode_video, video_ref
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import BadRowError, Side
from ume_r1.data.sft_rows import load_sft_pairs
from ume_r1.data.template import GEN_EMB, assistant_text
from ume_r1.grpo.grouping import encode_example

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def processor(tiny_model_dir) -> UMEProcessor:
    """The shared processor with the length and pixel caps these tests run into (the tiny profile's:
    video frames of a few patches, not Qwen2-VL's 128 to 768)."""
    video = MediaLimits(video_min_pixels=3136, video_max_pixels=12544)
    return UMEProcessor.from_pretrained(tiny_model_dir, max_prompt_length=512, max_pixels=3136, limits=video)


@pytest.fixture(scope="module")
def rows(synthetic_dir) -> list[dict]:
    return pq.read_table(synthetic_dir["train"]).slice(0, 8).to_pylist()


def _image_row(rows: list[dict]) -> int:
    return next(i for i, r in enumerate(rows) if r["query"]["images"])


def _rl_rows(processor, examples, on_bad_row="raise", truncation="error", seed=0) -> EncodedRows:
    encode = partial(encode_example, processor=processor, truncate=truncation == "truncate")
    return EncodedRows(examples, encode, on_bad_row, truncation, seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_media_that_fail_only_when_decoded_are_named_or_replaced(processor, rows, tmp_path, fmt):
    """Corrupt bytes, and a path to a decompression bomb: both pass loading, both are named by the
    data worker (raise) or replaced and counted (skip)."""
    Image.new("1", (12_000, 12_000)).save(tmp_path / "bomb.png")
    bad = [dict(r) for r in rows]
    k = _image_row(rows)
    j = next(i for i, r in enumerate(rows) if r["positive"]["images"] and i != k)
    bad[k]["query"] = dict(bad[k]["query"], images=[{"bytes": b"\x89PNG but cut short", "path": None}])
    bad[j]["positive"] = dict(bad[j]["positive"], images=[{"bytes": None, "path": "bomb.png"}])
    examples, report = load_examples(str(write_rows(bad, tmp_path / "rows", fmt)))
    assert report.skipped == 0  # the bytes and the file are there: loading decodes nothing

    def where(i: int) -> str:
        return f"rows.{fmt} " + ("line" if fmt == "jsonl" else "row") + f" {i + (fmt == 'jsonl')}"

    other = next(i for i in range(len(rows)) if i not in (j, k))
    with pytest.raises(
        BadRowError, match=rf"{where(k)}: query image 0 \(18 bytes\) is unreadable: not an image"
    ):
        _rl_rows(processor, examples)[[other, k]]
    with pytest.raises(BadRowError, match=rf"{where(j)}: positive image 0 'bomb.png'.* over data.max_image"):
        _rl_rows(processor, examples)[[j, other]]

    batch = _rl_rows(processor, examples, on_bad_row="skip")[[other, k, j]]
    assert batch.indices == [other, k, j] and len(batch.rows) == 3  # the batch keeps its size
    assert len(batch.skipped) == 2
    assert where(k) in batch.skipped[0] and "unreadable" in batch.skipped[0]
    assert where(j) in batch.skipped[1] and "decompression bomb" in batch.skipped[1]
    again = _rl_rows(processor, examples, on_bad_row="skip")[[other, k, j]]
    assert [r.query.key() for r in again.rows] == [r.query.key() for r in batch.rows]  # drawn by seed


def test_decompression_bomb_is_refused_before_decoding(processor, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 144 M pixels, a few kB on disk
    assert bomb.stat().st_size < 100_000
    side = Side("x", images=[ImageRef(shown="query image 0 'bomb.png'", path=str(bomb))])
    with pytest.raises(RowProblem, match=r"12000 x 12000 = 144,000,000 pixels, over data.max_image_pixels"):
        processor.encode(side)
    small = UMEProcessor(
        processor.tokenizer, processor.image_processor, 512, MediaLimits(max_image_pixels=1000)
    )
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    ok = Side("x", images=[ImageRef(shown="ok.png", path=str(tmp_path / "ok.png"))])
    with pytest.raises(RowProblem, match="1,600 pixels, over data.max_image_pixels=1,000"):
        small.encode(ok)
    assert processor.encode(ok).image_grid_thw is not None


def test_rl_prompt_length_policies(processor, rows, tmp_path):
    long = [dict(r) for r in rows]
    long[2]["query"] = dict(long[2]["query"], text=" ".join(f"word{i}" for i in range(400)))
    examples, _ = load_examples(str(write_rows(long, tmp_path / "rows", "parquet")))
    short = UMEProcessor(processor.tokenizer, processor.image_processor, 200, processor.limits)
    roomy = UMEProcessor(processor.tokenizer, processor.image_processor, 10_000, processor.limits)
    assert len(roomy.encode(examples[2].query).input_ids) > 1000
    with pytest.raises(
        BadRowError, match=r"rows\.parquet row 2: prompt has \d+ tokens, over data.max_prompt_length"
    ):
        _rl_rows(short, examples)[[1, 2]]
    skipped = _rl_rows(short, examples, truncation="skip")[[1, 2]]
    assert len(skipped.rows) == 2 and "row 2" in skipped.skipped[0] and not skipped.truncated
    cut = _rl_rows(short, examples, truncation="truncate")[[1, 2]]
    assert not cut.skipped and cut.truncated == [f"{tmp_path / 'rows.parquet'} row 2"]
    query = cut.rows[1].query
    assert query.truncated and len(query.input_ids) <= 200
    text = processor.tokenizer.decode(query.input_ids)
    assert "word0 word1" in text and "word399" not in text and "<disc_emb>" in text  # the template stays


def test_sft_length_policies_cut_the_reasoning(processor, sft_dir):
    pairs, _ = load_sft_pairs(sft_dir["train"])
    pair = pairs[0]
    pair.query_response = assistant_text(" ".join(f"step{i}" for i in range(300)), "a red circle")
    prompt = len(processor.encode(pair.query).input_ids)
    limit = prompt + 60
    with pytest.raises(
        TooLong, match=rf"query: prompt {prompt} \+ response \d+ tokens, over data.max_length"
    ):
        encode_pair(pair, processor, limit)
    encoded, cut = encode_pair(pair, processor, limit, truncate=True)
    response = processor.tokenizer.decode(encoded.responses[0])
    assert cut and prompt + len(encoded.responses[0]) <= limit
    assert response.startswith("<think>step0 step1") and response.endswith(
        "</think><answer>a red circle" + GEN_EMB
    )
    assert encoded.responses[1] == processor.tokenizer(pair.positive_response)["input_ids"]  # fits: untouched

    rows = EncodedRows(pairs, partial(encode_pair, processor=processor, max_length=limit), "raise", "skip", 0)
    batch = rows[[0, 1]]
    assert len(batch.rows) == 2 and "row 0: query: prompt" in batch.skipped[0]


def test_loader_workers_follow_the_order_ahead_of_the_step(processor, synthetic_dir):
    examples, _ = load_examples(synthetic_dir["train"])
    order = BatchOrder(len(examples), 4, seed=5)
    order.load_state_dict({"epoch": 1, "next_batch": 3, "num_rows": len(examples), "batch_size": 4})
    expected = BatchOrder(len(examples), 4, seed=5)
    expected.load_state_dict(order.state_dict())
    batches = list(
        row_batches(_rl_rows(processor, examples), order, 14, num_workers=2, prefetch=2, rank=1, world=2)
    )
    assert order.state_dict()["next_batch"] == 3  # the run's own order moves only as steps are taken
    assert len(batches) == 14
    for batch in batches:  # this rank's share, in order, across the epoch boundary
        assert batch.indices == next(expected)[1::2]
        assert [r.query.key() for r in batch.rows] == [
            encode_example(examples[i], processor)[0].query.key() for i in batch.indices
        ]


def test_a_worker_failure_names_the_row_and_skip_keeps_the_run(processor, rows, tmp_path):
    bad = [dict(r) for r in rows]
    k = _image_row(rows)
    bad[k]["query"] = dict(bad[k]["query"], images=[{"bytes": b"garbage", "path": None}])
    examples, _ = load_examples(str(write_rows(bad, tmp_path / "rows", "jsonl")))
    order = BatchOrder(len(examples), len(examples), seed=0, shuffle=False)
    with pytest.raises(
        BadRowError, match=rf"rows\.jsonl line {k + 1}: query image 0 \(7 bytes\) is unreadable"
    ):
        next(row_batches(_rl_rows(processor, examples), order, 1, num_workers=1))
    counts = BadRowCounts()
    logged: list[str] = []
    for batch in row_batches(_rl_rows(processor, examples, on_bad_row="skip"), order, 3, num_workers=1):
        metrics = counts.add(batch, logged.append)
    assert metrics == {"data/skipped_rows": 3.0, "data/truncated_rows": 0.0}
    assert len(logged) == 1 and f"line {k + 1}" in logged[0]


def _frames(directory: Path, count: int, size=(48, 32)) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"{i:03d}.png"
        Image.new("RGB", size, (i * 20 % 256, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_video_as_frame_directory_frame_list_or_video_file(processor, tmp_path):
    cv2 = pytest.importorskip("cv2")
    frames = _frames(tmp_path / "clip", 4)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    limits = MediaLimits(video_max_frames=3)
    from_dir = video_ref("clip", str(tmp_path), "query video")
    from_list = video_ref([{"path": f"clip/{p.name}"} for p in frames], str(tmp_path), "query video")
    assert [r.path for r in from_dir] == [r.path for r in from_list] == [str(p) for p in frames]
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 4, (48, 32))
    for i in range(7):
        writer.write(np.full((32, 48, 3), i * 30, dtype=np.uint8))
    writer.release()
    video = video_ref(["clip.avi"], str(tmp_path), "query video")
    assert isinstance(video, VideoFile)
    decoded = decode_video(video, limits)
    assert len(decoded) == 3 and decoded[0].size == (48, 32)  # frames 0, 3, 6 of 7
    assert [round(float(np.asarray(f).mean()) / 30) for f in decoded] == [0, 3, 6]
    for value in (from_dir, video):
        encoded = processor.encode(Side("a clip", video=value))
        assert encoded.video_grid_thw is not None and processor.video_pad_id in encoded.input_ids
    (tmp_path / "empty").mkdir()
    with pytest.raises(RowProblem, match="'empty'.* is a directory without frame images"):
        video_ref("empty", str(tmp_path), "query video")
    with pytest.raises(RowProblem, match="'gone.mp4'.* not found"):
        video_ref("gone.mp4", str(tmp_path), "query video")


def _conversation_rows(sft_dir, tmp_path: Path, count: int) -> list[dict]:
    """The synthetic SFT pairs in UME-R1's released conversation layout, images as files."""
    table = pq.read_table(sft_dir["train"]).slice(0, count).to_pylist()
    out = []
    for n, row in enumerate(table):
        item = {"task": row["task"]}
        for key, side, response in (
            ("qry", "query", "query_response"),
            ("pos", "positive", "positive_response"),
        ):
            images = []
            for m, image in enumerate(row[side]["images"]):
                name = f"imgs/{n}_{key}_{m}.png"
                (tmp_path / "imgs").mkdir(exist_ok=True)
                (tmp_path / name).write_bytes(image["bytes"])
                images.append(name)
            human = "<image>\n" * len(images) + row[side]["text"]
            item[key] = {
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": row[response]}],
                **({"image": images if len(images) > 1 else images[0]} if images else {}),
            }
        out.append(item)
    return out


def test_conversation_layout_loads_and_names_its_faults(sft_dir, tmp_path):
    rows = _conversation_rows(sft_dir, tmp_path, 4)
    path = tmp_path / "UME-sft-train.json"
    path.write_text(json.dumps(rows))
    native, _ = load_sft_pairs(sft_dir["train"])
    pairs, report = load_sft_pairs(str(path))
    assert report.loaded == 4
    for got, want in zip(pairs, native, strict=False):
        assert (got.query.text, got.positive.text, got.task) == (
            want.query.text,
            want.positive.text,
            want.task,
        )
        assert (got.query_response, got.positive_response) == (want.query_response, want.positive_response)
        assert len(got.query.images) == len(want.query.images)
    rows[1]["qry"]["conversations"][0]["value"] = "<image>\n<image>\ntwo placeholders"
    rows[2]["pos"]["conversations"] = [{"from": "human", "value": "x"}]
    rows[3]["pos"]["conversations"][1]["value"] = "no tags at all"
    path.write_text(json.dumps(rows))
    _, report = load_sft_pairs(str(path), on_bad_row="skip")
    assert report.skipped == 3
    assert "row 1: qry human turn has 2 <image> but" in report.reasons[0]
    assert "row 2: pos.conversations should be a list of a human turn and a gpt turn" in report.reasons[1]
    assert "row 3: pos_response lacks <think> and <gen_emb>" in report.reasons[2]


def test_conversation_layout_trains_a_step(sft_dir, tiny_model_dir, tmp_path):
    path = tmp_path / "UME-sft-train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _conversation_rows(sft_dir, tmp_path, 8)))
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft.train",
            "profile=sft_tiny",
            f"model.path={tiny_model_dir}",
            f"data.train_files={path}",
            "data.test_files=null",
            "train.global_batch_size=8",
            "train.total_steps=1",
            "train.save_freq=-1",
            f"output_dir={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and math.isfinite(row["loss"]) and row["gen_nce"] > 0 and row["ce"] > 0
    assert row["data/skipped_rows"] == 0 and (out / "final" / "model.safetensors").is_file()
