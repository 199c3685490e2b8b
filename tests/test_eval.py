"""Retrieval evaluation: metrics against hand-computed values, pass@k against enumeration, the oracle,
generative embeddings taken from the generated response, input errors, and an end-to-end run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_eval_config, write_eval_set

from ume_r1.data.collate import mm_token_type_ids
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import BadRowError, Side
from ume_r1.data.template import assistant_text
from ume_r1.eval.datasets import EvalRow
from ume_r1.eval.embed import Embedder, Embeddings
from ume_r1.eval.evaluate import embed_sides, evaluate, main, reasoning_probe, score_queries
from ume_r1.eval.report import write_outputs
from ume_r1.eval.synthetic_config import make_synthetic_eval
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.tiny import _train_tiny_tokenizer
from ume_r1.synthetic.shapes import side_struct

# ------------------------------------------------------------------------------------------------ metrics


# ------------------------------------------------------------------------------------------------- pass@k


# ----------------------------------------------------------------------------------------- oracle, means


# ---------------------------------------------------------------------------------------- data and errors


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
    write_eval_set(tmp_path / "ds.parquet", [good, corrupt])
    config = write_eval_config(
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
    write_eval_set(tmp_path / "ds.parquet", rows)
    config = write_eval_config(
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
    done = subprocess.run(
        [sys.executable, "-m", "ume_r1.eval.evaluate", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads((out / "results.json").read_text())
    assert vllm["per_query"]["gen"] == hf["per_query"]["gen"]
    assert vllm["generation"] == json.loads(json.dumps(hf["generation"]))
