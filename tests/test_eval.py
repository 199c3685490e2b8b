"""Retrieval evaluation: metrics against hand-computed values, pass@k against enumeration, the oracle,
generative embeddings taken from the generated response, input errors, and an end-to-end run."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from ume_r1.batch import mm_token_type_ids
from ume_r1.data import BadRowError, Side
from ume_r1.embed import Embedder, Embeddings
from ume_r1.evaluate import (
    EVAL_SCHEMA,
    EvalRow,
    embed_sides,
    evaluate,
    load_config,
    load_dataset,
    main,
    make_synthetic_eval,
    reasoning_probe,
    score_queries,
)
from ume_r1.metrics import (
    aggregate,
    chance_level,
    hit_at_1,
    ndcg_at_k,
    oracle,
    pass_at_k,
    pass_at_k_curve,
    pessimistic_ranking,
)
from ume_r1.model import _train_tiny_tokenizer, load_model
from ume_r1.processor import UMEProcessor
from ume_r1.report import write_outputs
from ume_r1.synthetic import side_struct, write_atomic
from ume_r1.template import assistant_text

# ------------------------------------------------------------------------------------------------ metrics


def test_hit_at_1_hand_cases_and_strict_ties() -> None:
    assert hit_at_1([0.1, 0.9, 0.3], [1]) == 1.0
    assert hit_at_1([0.1, 0.9, 0.3], [2]) == 0.0
    assert hit_at_1([0.1, 0.9, 0.3], [0, 1]) == 1.0  # any relevant item on top is a hit
    # A relevant candidate tied with an irrelevant one loses the tie, whatever the candidate order.
    assert hit_at_1([0.5, 0.5, 0.1], [0]) == 0.0
    assert hit_at_1([0.5, 0.5, 0.1], [1]) == 0.0
    assert hit_at_1([0.5, 0.5, 0.1], [0, 1]) == 1.0  # a tie among relevant items is still a hit
    assert hit_at_1([0.7, 0.7, 0.7], [2]) == 0.0  # collapsed embeddings score 0, not chance
    assert hit_at_1([0.3], [0]) == 1.0


def test_ndcg_at_5_hand_cases() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]  # candidate i has rank i + 1
    assert ndcg_at_k(scores, [0]) == pytest.approx(1.0)
    assert ndcg_at_k(scores, [2]) == pytest.approx(1 / math.log2(4))  # rank 3: 0.5
    # Two relevant at ranks 1 and 3; ideal puts them at ranks 1 and 2.
    assert ndcg_at_k(scores, [0, 2]) == pytest.approx((1 + 1 / 2) / (1 + 1 / math.log2(3)))
    # A relevant item beyond rank 5 adds nothing to DCG but counts in the ideal DCG.
    assert ndcg_at_k(scores, [5]) == 0.0
    assert ndcg_at_k(scores, [1, 5]) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    # More relevant items than k: the ideal DCG is capped at 5 terms, so a full top 5 scores 1.
    assert ndcg_at_k(scores, list(range(7))) == pytest.approx(1.0)
    assert ndcg_at_k(scores, [0, 1, 2, 3, 6]) == pytest.approx(
        sum(1 / math.log2(r + 1) for r in (1, 2, 3, 4)) / sum(1 / math.log2(r + 1) for r in range(1, 6))
    )
    # Ties: the relevant candidate ranks below the irrelevant one it ties with.
    assert pessimistic_ranking([0.5, 0.5, 0.1], [0]) == [1, 0, 2]
    assert ndcg_at_k([0.5, 0.5, 0.1], [0]) == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("metric", ["hit@1", "ndcg@5"])
@pytest.mark.parametrize(("n_candidates", "relevant"), [(4, [1]), (4, [0, 3]), (7, [2, 5, 6])])
def test_chance_level_is_mean_over_all_rankings(metric: str, n_candidates: int, relevant: list[int]) -> None:
    total = 0.0
    perms = list(itertools.permutations(range(n_candidates)))
    for perm in perms:  # scores without ties, every ranking equally likely
        scores = [-float(perm.index(i)) for i in range(n_candidates)]
        total += hit_at_1(scores, relevant) if metric == "hit@1" else ndcg_at_k(scores, relevant)
    assert chance_level(metric, n_candidates, len(relevant)) == pytest.approx(total / len(perms))


# ------------------------------------------------------------------------------------------------- pass@k


def _enumerated_pass_at_k(hits: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(range(len(hits)), k))
    return Fraction(sum(any(hits[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration() -> None:
    for n in range(1, 7):
        for c in range(n + 1):
            hits = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_enumerated_pass_at_k(hits, k)), abs=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # pass@1 is the sample hit rate


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(1000, 500) has ~300 digits; the product form must still match the exact rational value.
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_curve_averages_queries() -> None:
    hits = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    curve = pass_at_k_curve(hits)
    for k in range(1, 5):
        expected = np.mean([float(_enumerated_pass_at_k(list(row), k)) for row in hits])
        assert curve[k - 1] == pytest.approx(expected)
    assert curve[0] == pytest.approx(hits.mean()) and curve == sorted(curve)


# ----------------------------------------------------------------------------------------- oracle, means


def test_oracle_picks_per_instance() -> None:
    disc = [1.0, 0.0, 1.0, 0.0, 0.5]
    gen = [0.0, 1.0, 1.0, 0.0, 0.8]
    picked = oracle(disc, gen)
    assert picked.tolist() == [1.0, 1.0, 1.0, 0.0, 0.8]
    # Better than either mode on average, and better than picking the better mode per dataset.
    assert picked.mean() > max(np.mean(disc), np.mean(gen))


def test_aggregate_meta_task_and_overall_means() -> None:
    out = aggregate({"a": 1.0, "b": 0.0, "c": 1.0}, {"a": "CLS", "b": "CLS", "c": "QA"})
    assert out["meta_tasks"] == {"CLS": 0.5, "QA": 1.0}
    assert out["overall"] == pytest.approx(2 / 3)  # mean over datasets, not over meta-tasks


# ---------------------------------------------------------------------------------------- data and errors


def _write_eval(path: Path, rows: list[dict]) -> str:
    write_atomic(rows, str(path), EVAL_SCHEMA)
    return str(path)


def _config(path: Path, datasets: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return str(path)


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
    config = _config(
        tmp_path / "eval.yaml", [{"name": "ds1", "meta_task": "RET", "metric": "hit@1", "path": "no.parquet"}]
    )
    with pytest.raises(FileNotFoundError, match=r"dataset 'ds1' points at missing file 'no.parquet'"):
        load_config(config)
    with pytest.raises(FileNotFoundError, match="eval config"):
        load_config(tmp_path / "absent.yaml")
    bad = _config(
        tmp_path / "bad.yaml", [{"name": "ds1", "meta_task": "RET", "metric": "recall@3", "path": "x"}]
    )
    with pytest.raises(ValueError, match="recall@3"):
        load_config(bad)


def test_label_outside_candidates_and_empty_labels(tmp_path: Path) -> None:
    good = {"query": side_struct("q"), "candidates": [side_struct("a"), side_struct("b")], "labels": [1]}
    path = _write_eval(tmp_path / "ds.parquet", [good, {**good, "labels": [0, 5]}])
    config = _config(
        tmp_path / "eval.yaml", [{"name": "ds", "meta_task": "RET", "metric": "hit@1", "path": "ds.parquet"}]
    )
    (spec,) = load_config(config)
    with pytest.raises(
        BadRowError,
        match=r"dataset 'ds': .*ds.parquet row 1: the candidate list does not contain the label 5",
    ):
        load_dataset(spec)
    _write_eval(Path(path), [{**good, "labels": []}])
    with pytest.raises(BadRowError, match="row 0: labels is empty"):
        load_dataset(spec)
    _write_eval(Path(path), [{**good, "labels": [-1]}])
    with pytest.raises(BadRowError, match="does not contain the label -1"):
        load_dataset(spec)


def test_cross_mode_scores_queries_of_one_mode_against_candidates_of_the_other() -> None:
    """Hand-made: side 0 is the query, sides 1 and 2 its candidates, side 2 the relevant one. Each mode
    alone ranks side 1 first; the generative query against discriminative candidates, and the reverse,
    rank side 2 first."""
    disc = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    gen = F.normalize(torch.tensor([[0.0, 1.0, 0.2], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), dim=-1)
    rows = [EvalRow(query=Side("q"), candidates=[Side("a"), Side("b")], labels=[1])]
    score = lambda q, c: score_queries(q, [0], [[1, 2]], rows, "hit@1", c)  # noqa: E731
    assert score(disc, None) == [0.0]  # disc query . side 1's disc = 0.99 > side 2's = 0 (wrong)
    assert score(gen, None) == [0.0]  # gen query . side 1's gen = 0.2 > side 2's = 0 (wrong)
    assert score(gen, disc) == [1.0]  # gen query . side 2's disc = 0.98 > side 1's = 0.10
    assert score(disc, gen) == [1.0]  # disc query . side 2's gen = 1 > side 1's = 0


def test_media_that_fail_when_decoded_are_named(tiny_model_dir: str, tmp_path: Path) -> None:
    good = {"query": side_struct("q"), "candidates": [side_struct("a"), side_struct("b")], "labels": [1]}
    corrupt = {**good, "candidates": [side_struct("a"), side_struct("b", b"\x89PNG cut short")]}
    _write_eval(tmp_path / "ds.parquet", [good, corrupt])
    config = _config(
        tmp_path / "eval.yaml", [{"name": "ds", "meta_task": "RET", "metric": "hit@1", "path": "ds.parquet"}]
    )
    with pytest.raises(
        BadRowError, match=r"dataset 'ds': .*ds.parquet row 1: candidates\[1\] image 0 .* unreadable"
    ):
        evaluate(tiny_model_dir, config, modes=["disc"])


def test_model_without_gen_emb_is_named(tiny_model_dir: str, tmp_path: Path, capsys) -> None:
    bad_dir = tmp_path / "not_ume"
    shutil.copytree(tiny_model_dir, bad_dir)
    for f in bad_dir.glob("tokenizer*"):
        f.unlink()
    tokenizer = _train_tiny_tokenizer(512, [])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<disc_emb>"]})
    tokenizer.save_pretrained(bad_dir)
    rows = [{"query": side_struct("q"), "candidates": [side_struct("a")], "labels": [0]}]
    _write_eval(tmp_path / "ds.parquet", rows)
    config = _config(
        tmp_path / "eval.yaml", [{"name": "ds", "meta_task": "RET", "metric": "hit@1", "path": "ds.parquet"}]
    )
    with pytest.raises(ValueError, match=r"not_ume.*<gen_emb>"):
        evaluate(str(bad_dir), config)
    # The CLI turns it into one line on stderr that names the directory.
    assert main(["--model", str(bad_dir), "--config", config, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad_dir) in err and "<gen_emb>" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- generative embeddings


def test_gen_embedding_comes_from_the_generated_response(tiny_model_dir: str) -> None:
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    embedder = Embedder(model, processor, torch.device("cpu"), batch_size=4, max_new_tokens=6)
    sides = [Side("a red circle"), Side("What shape is it?"), Side("blue")]
    emb = embed_sides(embedder, sides, ["disc", "gen"])
    g = processor.gen_emb_id
    for i, side in enumerate(sides):
        prompt = processor.encode(side)
        assert g in prompt.input_ids  # the instruction's literal tag: a trap the embedding must avoid
        # greedy, as embed_sides
        (response,) = embedder.rollout.generate([prompt], n=1, seed=0, do_sample=False)[0]
        assert processor.tokenizer.decode(response) == emb.responses[i]
        ids = torch.tensor([prompt.input_ids + response])
        with torch.no_grad():
            hidden = model.model(
                input_ids=ids,
                mm_token_type_ids=mm_token_type_ids(ids, processor.image_pad_id, processor.video_pad_id),
            ).last_hidden_state[0]
        start = len(prompt.input_ids)
        tags = [k for k, t in enumerate(response) if t == g]
        at = start + (tags[-1] if tags else len(response) - 1)  # last generated tag, else the last token
        torch.testing.assert_close(emb.gen[i], F.normalize(hidden[at], dim=-1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            emb.disc[i],
            F.normalize(hidden[prompt.input_ids.index(processor.disc_emb_id)], dim=-1),
            rtol=1e-4,
            atol=1e-4,
        )
        for pos in (k for k, t in enumerate(prompt.input_ids) if t == g):
            assert not torch.allclose(emb.gen[i], F.normalize(hidden[pos], dim=-1), atol=1e-3)


def _gen_embedding(model, processor: UMEProcessor, side: Side, response: str) -> torch.Tensor:
    """Directly: the L2-normalised hidden state at the response's last <gen_emb> (text side, one forward)."""
    prompt = processor.encode(side).input_ids
    response_ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response_ids])
    types = mm_token_type_ids(ids, processor.image_pad_id, processor.video_pad_id)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, mm_token_type_ids=types).last_hidden_state[0]
    last = max(k for k, t in enumerate(response_ids) if t == processor.gen_emb_id)
    return F.normalize(hidden[len(prompt) + last], dim=-1)


def test_reasoning_probe_equals_a_direct_computation(tiny_model_dir: str) -> None:
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    embedder = Embedder(model, processor, torch.device("cpu"), batch_size=2, max_new_tokens=6)
    sides = [Side("a red circle"), Side("What shape is it?"), Side("blue"), Side("two squares")]
    texts = [
        assistant_text("It is round and red.", "a red circle"),
        assistant_text("The question asks for a shape.", "a shape"),
        "blue<gen_emb>",  # no <think>: neither probed nor a donor
        assistant_text("Two of them.", "two squares"),
    ]
    gen, has = embedder.embed_responses(sides, texts)
    assert has.all()
    for side, text, g in zip(sides, texts, gen, strict=True):  # teacher-forced = a direct forward
        torch.testing.assert_close(g, _gen_embedding(model, processor, side, text), rtol=1e-4, atol=1e-4)
    emb = Embeddings(disc=gen, gen=gen, responses=texts, has_gen_emb=has)
    # side 0 takes side 1's think, side 3 takes side 0's (the next side, wrapping); 1 and 2 have no donor
    swapped = {
        0: assistant_text("The question asks for a shape.", "a red circle"),
        3: assistant_text("It is round and red.", "two squares"),
    }
    direct = np.mean(
        [float(gen[i] @ _gen_embedding(model, processor, sides[i], text)) for i, text in swapped.items()]
    )
    assert reasoning_probe(embedder, sides, emb) == pytest.approx(direct, abs=1e-4)
    assert reasoning_probe(embedder, sides[2:3], Embeddings(gen[2:3], gen[2:3], texts[2:3], has[2:3])) is None


# ------------------------------------------------------------------------------------------- end to end


def test_evaluate_end_to_end(tiny_model_dir: str, synthetic_dir: dict[str, str], tmp_path: Path) -> None:
    config = make_synthetic_eval(synthetic_dir["test"], str(tmp_path / "eval"))
    spec = yaml.safe_load(Path(config).read_text())
    # The retrieval file once more, scored with NDCG@5 as a visual-document task would be.
    spec["datasets"].append(
        {"name": "ret_ndcg", "meta_task": "VisDoc", "metric": "ndcg@5", "path": "retrieval.parquet"}
    )
    Path(config).write_text(yaml.safe_dump(spec))

    n = 3
    results = evaluate(
        tiny_model_dir,
        config,
        pass_k_samples=n,
        temperature=1.0,
        max_new_tokens=8,
        batch_size=16,
        device="cpu",
    )
    names = [d["name"] for d in results["datasets"]]
    assert names == ["synthetic_classification", "synthetic_vqa", "synthetic_retrieval", "ret_ndcg"]
    assert set(results["scores"]) == {"disc", "gen", "oracle", "gen2disc", "disc2gen", "chance"}
    # Shared candidates are embedded once (the ndcg dataset reuses every retrieval side).
    assert results["sides"]["distinct"] < results["sides"]["occurrences"]
    for name in names:
        d, g, o = (np.array(results["per_query"][m][name]) for m in ("disc", "gen", "oracle"))
        assert np.array_equal(o, np.maximum(d, g))
        assert results["scores"]["oracle"][name] >= max(
            results["scores"]["disc"][name], results["scores"]["gen"][name]
        )
        assert 0 < results["scores"]["chance"][name] < 1
    # Hit@1 and NDCG@5 agree where they must: an NDCG of 1 is a hit, a hit is an NDCG of 1 (one label).
    hit = np.array(results["per_query"]["gen"]["synthetic_retrieval"])
    ndcg = np.array(results["per_query"]["gen"]["ret_ndcg"])
    assert np.array_equal(hit == 1, ndcg == 1) and np.all(ndcg >= 0)
    for m in ("disc", "gen", "oracle"):
        assert results["overall"][m] == pytest.approx(np.mean([results["scores"][m][x] for x in names]))
        assert set(results["meta_tasks"][m]) == {"CLS", "QA", "RET", "VisDoc"}
    assert results["generation"]["examples"] and 0 <= results["generation"]["format_rate"] <= 1
    sensitivity = results["generation"]["reasoning_sensitivity"]  # None: no response with a <think> block
    assert sensitivity is None or -1 <= sensitivity <= 1

    pk = results["pass_at_k"]
    assert pk["k"] == [1, 2, 3] and pk["mean"] == sorted(pk["mean"])
    assert -1 <= pk["within_query_cosine"] <= 1 + 1e-6
    for name in names:
        counts = pk["hits_per_query"][name]
        assert pk["per_dataset"][name][0] == pytest.approx(np.mean(counts) / n)
        assert pk["per_dataset"][name][-1] == pytest.approx(np.mean([c > 0 for c in counts]))

    paths = write_outputs(results, str(tmp_path / "run"))
    assert json.loads(Path(paths["results.json"]).read_text())["scores"] == results["scores"]
    table = Path(paths["results.md"]).read_text()
    header = "| dataset | meta-task | metric | queries | disc | gen | oracle | gen2disc | disc2gen | chance |"
    assert header in table
    assert all(name in table for name in names) and "| pass@k |" in table
    for png in ("modes.png", "pass_at_k.png"):
        assert Path(paths[png]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "modes.png",
        "pass_at_k.png",
        "results.json",
        "results.md",
    ]  # no temp files left behind


def test_evaluate_with_vllm_generation_equals_hf(
    tiny_model_dir: str, synthetic_dir: dict[str, str], tmp_path: Path
) -> None:
    """The CLI with `--rollout vllm` (its own process: vLLM's state is per process) scores exactly what
    the hf backend scores: greedy generations are the same tokens, embedded by the same forward."""
    config = make_synthetic_eval(synthetic_dir["test"], str(tmp_path / "eval"))
    common = dict(modes=["gen"], max_new_tokens=16, batch_size=16, device="cpu")
    hf = evaluate(tiny_model_dir, config, **common)
    out = tmp_path / "vllm"
    args = ["--model", tiny_model_dir, "--config", config, "--out", str(out), "--modes", "gen"]
    args += ["--max-new-tokens", "16", "--batch-size", "16", "--device", "cpu", "--rollout", "vllm"]
    done = subprocess.run([sys.executable, "-m", "ume_r1.evaluate", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads((out / "results.json").read_text())
    assert vllm["per_query"]["gen"] == hf["per_query"]["gen"]
    assert vllm["generation"] == json.loads(json.dumps(hf["generation"]))
