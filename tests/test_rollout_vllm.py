"""The vllm rollout backend with vLLM really running (its CPU build in CI): greedy parity with hf for
text, image and video prompts, the sampling contract, the engines' log-probs of what they sample, and
weights synced in place from the learner.

The model is the tiny one with tied embeddings (one table, as Qwen2-VL-2B): a sync sends the table once,
as `embed_tokens`, and vLLM's output head must follow it. (The untied tiny model's syncs are checked by
the GRPO runs in test_grpo_e2e, through the rollout-vs-learner log-prob metric.) One engine serves the
module (vLLM's distributed state is per process); the weight-sync test, which changes its weights, runs
last."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_learner
from PIL import Image
from vllm import SamplingParams

from ume_r1.data.collate import media_inputs, mm_token_type_ids, pack_sequences
from ume_r1.data.media import MediaLimits
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.rollout.factory import rollout_config
from ume_r1.rollout.hf import HFRollout
from ume_r1.rollout.vllm import (
    VLLMRollout,
    chunked_prefill,
    collapse_placeholders,
    seeded_requests,
    sleep_level,
)
from ume_r1.rollout.weights import SyncStats, buckets

RESPONSE_LENGTH = 24
# Video frame bounds of the tests' own (a few patches, not Qwen2-VL's defaults): vLLM expands a video as
# the processor does only if these reach its processor too (rollout.mm_processor_kwargs).
VIDEO = MediaLimits(video_min_pixels=2 * 3136, video_max_pixels=4 * 3136)


def engine_config(name: str):
    return rollout_config(
        name=name,
        micro_batch_size=8,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        n=4,
        response_length=RESPONSE_LENGTH,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        free_cache_engine=False,
        max_model_len=1024,
        max_num_seqs=64,
        cpu_kvcache_space_gb=1,
        limit_mm_per_prompt={"image": 2, "video": 1},
        mm_processor_kwargs={
            "videos_kwargs": {"min_pixels": VIDEO.video_min_pixels, "max_pixels": VIDEO.video_max_pixels}
        },
    )


TABLE = "model.language_model.embed_tokens.weight"  # the one table of a tied model


@pytest.fixture(scope="module")
def engines(tied_model_dir):
    hf = HFRollout.load(tied_model_dir, engine_config("hf"), torch.device("cpu"), torch.float32)
    return hf, VLLMRollout(tied_model_dir, engine_config("vllm"), torch.float32)


@pytest.fixture(scope="module")
def prompts(tied_model_dir, synthetic_dir):
    """Text only, one image, and a four-frame video."""
    processor = UMEProcessor.from_pretrained(tied_model_dir, limits=VIDEO)
    examples, _ = load_examples(synthetic_dir["train"])
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (60, 52, 3), dtype=np.uint8)) for _ in range(4)]
    sides = [
        Side(text="a red circle beside a blue star"),
        examples[0].query,
        Side(text="a clip", video=frames),
    ]
    return processor, [processor.encode(s) for s in sides]


def vllm_logprobs(engine: VLLMRollout, prompts, responses: list[list[int]]) -> list[list[float]]:
    """vLLM's own log-probs of its greedy tokens (the responses must be its greedy ones)."""
    params = SamplingParams(
        temperature=0.0,
        max_tokens=RESPONSE_LENGTH,
        stop_token_ids=engine.stop_ids,
        logprobs=0,
        detokenize=False,
    )
    outs = engine.llm.generate([engine._request(p) for p in prompts], params, use_tqdm=False)
    result = []
    for out, response in zip(outs, responses, strict=True):
        assert list(out.outputs[0].token_ids) == response
        result.append(
            [step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, response, strict=True)]
        )
    return result


def hf_logprobs(
    policy: EmbeddingPolicy, prompts, responses: list[list[int]], pad_id: int
) -> list[list[float]]:
    """Log-probs of the responses under an HF forward of prompt + response (the learner's formula)."""
    batch = pack_sequences(prompts, responses, pad_id)
    with torch.no_grad():
        out = policy(**batch, **media_inputs(prompts), with_entropy=False)
    return [row[: len(r)].tolist() for row, r in zip(out["log_probs"], responses, strict=True)]


def test_placeholders_collapse_to_one_per_image():
    assert collapse_placeholders([1, 7, 7, 7, 2, 1, 7, 7, 2, 8, 8, 3], (7, 8)) == [1, 7, 2, 1, 7, 2, 8, 3]


def vllm_head_is_table(engine: VLLMRollout) -> bool:
    """Whether vLLM's output head is its embedding table (read inside the engine)."""

    def tied(worker) -> bool:
        modules = dict(worker.model_runner.get_model().named_modules())
        head = next(m for name, m in modules.items() if name.endswith("lm_head"))
        table = next(m for name, m in modules.items() if name.endswith("embed_tokens"))
        return head.weight.data_ptr() == table.weight.data_ptr()

    return all(engine.llm.collective_rpc(tied))


def test_greedy_outputs_and_logprobs_match_hf(engines, prompts, tied_model_dir):
    hf, vllm = engines
    processor, encoded = prompts
    expected = hf.generate(encoded, n=2, seed=0, do_sample=False)
    got = vllm.generate(encoded, n=2, seed=0, do_sample=False)
    assert got == expected  # text, image and video prompts
    responses = [group[0] for group in got]
    assert all(len(r) > 1 for r in responses)
    model, _ = load_model(tied_model_dir)
    policy = EmbeddingPolicy(model.eval(), processor.gen_emb_id)
    reference = hf_logprobs(policy, encoded, responses, processor.pad_id)
    for mine, theirs in zip(vllm_logprobs(vllm, encoded, responses), reference, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)


@pytest.mark.parametrize("backend", [0, 1], ids=["hf", "vllm"])
def test_sampled_logprobs_are_the_sampling_distribution(engines, prompts, tied_model_dir, backend):
    """`sample` returns each token's log-prob under what was sampled from: a plain forward's logits
    with the suppressed ids removed, at the sampling temperature (here 0.7)."""
    engine = engines[backend]
    processor, encoded = prompts
    engine.config.temperature = 0.7
    try:
        sampled = engine.sample(encoded, n=2, seed=3)
    finally:
        engine.config.temperature = 1.0
    assert [len(g) for g in sampled.responses] == [2, 2, 2]
    model, _ = load_model(tied_model_dir)
    flat = [
        (p, r, lp)
        for p, rs, lps in zip(encoded, sampled.responses, sampled.logprobs, strict=True)
        for r, lp in zip(rs, lps, strict=True)
    ]
    batch = pack_sequences([p for p, _, _ in flat], [r for _, r, _ in flat], processor.pad_id)
    types = mm_token_type_ids(batch["input_ids"], model.config.image_token_id, model.config.video_token_id)
    media = media_inputs([p for p, _, _ in flat])
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=types,
            **media,
        ).logits.float()
    width = batch["responses"].shape[1]
    logits = logits[:, -width - 1 : -1]
    logits[..., engine.suppressed] = float("-inf")
    want = torch.log_softmax(logits / 0.7, dim=-1).gather(2, batch["responses"][..., None])[..., 0]
    for i, (_, response, got) in enumerate(flat):
        assert len(got) == len(response)
        np.testing.assert_allclose(got, want[i, : len(response)].numpy(), atol=2e-4)


@pytest.mark.parametrize("backend", [0, 1], ids=["hf", "vllm"])
def test_sampling_contract(engines, prompts, tied_model_dir, backend):
    engine = engines[backend]
    _, encoded = prompts
    # Make vision placeholders and the spare rows past the tokenizer the likeliest tokens: only
    # suppression keeps them out (the table is tied: these rows are also the input embeddings of
    # tokens the prompts do not contain).
    assert len(engine.suppressed) == 4 + 640 - len(engine.tokenizer)
    lm_head = load_model(tied_model_dir)[0].get_output_embeddings().weight.detach()
    boosted = lm_head.clone()
    generator = torch.Generator().manual_seed(0)
    boosted[engine.suppressed] = (
        lm_head.abs().max() * 50 * torch.randn(len(engine.suppressed), lm_head.shape[1], generator=generator)
    )
    # ...and one stop token likely after some states, so that stopping is exercised whatever the weights
    # (one no prompt contains: its row is an input embedding too).
    stop = next(t for t in engine.stop_ids if not any(t in p.input_ids for p in encoded))
    boosted[stop] = lm_head.abs().max() * 5 * torch.randn(lm_head.shape[1], generator=generator)
    engine.load_weights([(TABLE, boosted)])
    try:
        groups = engine.generate(encoded, n=4, seed=7)
        assert len(groups) == len(encoded) and all(len(g) == 4 for g in groups)
        stops = set(engine.stop_ids)
        for response in (r for g in groups for r in g):
            assert 1 <= len(response) <= RESPONSE_LENGTH
            assert not stops & set(response[:-1]), "a response runs past its first stop token"
            assert len(response) == RESPONSE_LENGTH or response[-1] in stops
            assert not set(engine.suppressed) & set(response), "a vision placeholder or spare row was sampled"
        assert groups == engine.generate(encoded, n=4, seed=7)
        assert groups != engine.generate(encoded, n=4, seed=8)
        assert any(r[-1] in stops for g in groups for r in g)
    finally:
        engine.load_weights([(TABLE, lm_head)])


@pytest.fixture
def tied_learner(tied_model_dir, single_rank):
    return make_learner(tied_model_dir)


def test_weight_sync_after_an_update_matches_hf(engines, prompts, tied_learner):
    """One learner update, then the actor's buckets into the engine in one load: vLLM's output head is
    still its (updated) embedding table, its log-probs equal an HF forward of the learner's weights, and
    differ from the engine's before the sync."""
    learner = tied_learner
    _, vllm = engines
    processor, encoded = prompts
    tok = processor.tokenizer
    answers = ["<think>red round</think><answer>red circle<gen_emb>", "blue star", "green square", "yellow"]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    data, prompt_index = build_sequences(encoded[:2], [[ids[0], ids[1]], [ids[2], ids[3]]])
    data.union(learner.compute_log_prob(data))
    data.union(learner.compute_ref_log_prob(data))
    data.batch["advantages"] = data.batch["response_mask"] * torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    data.meta_info["seed"] = 0
    learner.update_actor(data)

    before = vllm.generate(encoded, n=1, seed=0, do_sample=False)
    stale = vllm_logprobs(vllm, encoded, [group[0] for group in before])
    learner.config.rollout.weight_bucket_mb = 0.05  # several buckets even for the tiny model
    sent = list(learner.rollout_weight_buckets())
    assert len(sent) > 1
    names = [name for bucket in sent for name, _ in bucket]
    assert not any(name.startswith("model.visual.") for name in names)  # frozen: never sent
    assert TABLE in names and "lm_head.weight" not in names  # tied: one table, sent once
    reloads = []
    rpc = vllm.llm.collective_rpc
    vllm.llm.collective_rpc = lambda method, **kw: (reloads.append(method), rpc(method, **kw))[1]
    try:
        stats = SyncStats()
        vllm.load_weights(stats.stream(sent))
    finally:
        vllm.llm.collective_rpc = rpc
    assert reloads[0] == "reload_weights" and reloads.count("reload_weights") == 1
    assert stats.buckets == len(sent)  # one load streams every bucket
    assert vllm_head_is_table(vllm)
    after = vllm.generate(encoded, n=1, seed=0, do_sample=False)
    responses = [group[0] for group in after]

    seqs, _ = build_sequences(encoded, [[r] for r in responses])
    learner_lp = learner.compute_log_prob(seqs).batch["old_log_probs"]
    reference = [row[: len(r)].tolist() for row, r in zip(learner_lp, responses, strict=True)]
    mine = vllm_logprobs(vllm, encoded, responses)
    for got, want in zip(mine, reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    moved = max(abs(a - b) for m, p in zip(mine, stale, strict=True) for a, b in zip(m, p, strict=False))
    assert after != before or moved > 1e-4  # the sync changed what the engine computes


def test_buckets_never_split_a_layer():
    named = [(f"model.language_model.layers.{i}.{p}", torch.zeros(10)) for i in range(3) for p in ("a", "b")]
    named.append(("lm_head.weight", torch.zeros(100)))
    got = list(buckets(named, max_bytes=50))
    assert [[n.split(".")[3] if "layers" in n else n for n, _ in b] for b in got] == [
        ["0", "0"],
        ["1", "1"],
        ["2", "2"],
        ["lm_head.weight"],
    ]
    assert sum(len(b) for b in buckets(named, max_bytes=10**9)) == len(named)


def test_gpu_defaults_and_sleep_level(monkeypatch):
    """Seeded requests and chunked prefill off on CPU (repeatable sampling); on CUDA vLLM's own fast
    defaults, and the hybrid engine sleeps at level 2 (a standalone one, owning its GPU, never)."""
    cfg = engine_config("vllm")
    cfg.free_cache_engine = True
    assert seeded_requests(cfg) and chunked_prefill(cfg) is False and sleep_level(cfg, colocated=True) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not seeded_requests(cfg) and chunked_prefill(cfg) is None
    assert sleep_level(cfg, colocated=True) == 2 and sleep_level(cfg, colocated=False) == 0
    cfg.per_request_seed = True
    assert seeded_requests(cfg) and chunked_prefill(cfg) is False


def test_wake_order_after_sleep(monkeypatch):
    """vLLM's sleep mode needs CUDA, so a recorder stands in for the engine and this checks our order of
    calls (verl's): asleep at level 2, a load frees torch's cached blocks, wakes the weights, streams
    every tensor through one reload, frees again, wakes the KV cache, then resets the caches once; and
    generating before a load is refused (the weights were dropped)."""
    calls: list[str] = []

    class Recorder:
        llm_engine = SimpleNamespace(reset_encoder_cache=lambda: calls.append("reset encoder cache"))

        def sleep(self, level: int) -> None:
            calls.append(f"sleep {level}")

        def wake_up(self, tags: list[str] | None = None) -> None:
            calls.append(f"wake {tags}")

        def collective_rpc(self, method, kwargs=None):
            calls.append(getattr(method, "__name__", method))
            if kwargs:
                calls.append(f"{len(list(kwargs['weights_iterator']))} tensors")

        def reset_prefix_cache(self) -> None:
            calls.append("reset prefix cache")

    monkeypatch.setattr("ume_r1.rollout.vllm.empty_cache", lambda: calls.append("empty cache"))
    engine = object.__new__(VLLMRollout)
    engine.llm, engine.sleep_level, engine.asleep, engine.tied = Recorder(), 2, False, True
    engine.sleep()
    assert engine.weights_discarded and engine.resends_all_weights
    with pytest.raises(RuntimeError, match="load_weights before generating"):
        engine.wake_up()
    stats = SyncStats()
    engine.load_weights(
        stats.stream([[("a", torch.zeros(2))], [("b", torch.zeros(3)), ("c", torch.zeros(1))]])
    )
    assert calls == [
        "sleep 2",
        "empty cache",
        "wake ['weights']",
        "reload_weights",
        "3 tensors",
        "refresh_tied_head",
        "empty cache",
        "wake ['kv_cache']",
        "reset encoder cache",
        "reset prefix cache",
    ]
    assert not engine.asleep and stats.buckets == 2 and stats.tensors == 3
