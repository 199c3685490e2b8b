"""The vllm rollout backend with vLLM really running (its CPU build in CI): greedy parity with hf for
text, image and video prompts, the sampling contract, and weights synced in place from the learner.

One engine serves the module (vLLM's distributed state is per process); the weight-sync test, which
changes its weights, runs last."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from vllm import SamplingParams

from ume_r1.data.collate import media_inputs, pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.rollout.factory import rollout_config
from ume_r1.rollout.hf import HFRollout
from ume_r1.rollout.vllm import VLLMRollout, collapse_placeholders
from ume_r1.rollout.weights import buckets

RESPONSE_LENGTH = 24


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
    )


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    hf = HFRollout.load(tiny_model_dir, engine_config("hf"), torch.device("cpu"), torch.float32)
    return hf, VLLMRollout(tiny_model_dir, engine_config("vllm"), torch.float32)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir, synthetic_dir):
    """Text only, one image, and a four-frame video."""
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
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


def test_greedy_outputs_and_logprobs_match_hf(engines, prompts, tiny_model_dir):
    hf, vllm = engines
    processor, encoded = prompts
    expected = hf.generate(encoded, n=2, seed=0, do_sample=False)
    got = vllm.generate(encoded, n=2, seed=0, do_sample=False)
    assert got == expected  # text, image and video prompts
    responses = [group[0] for group in got]
    assert all(len(r) > 1 for r in responses)
    model, _ = load_model(tiny_model_dir)
    policy = EmbeddingPolicy(model.eval(), processor.gen_emb_id)
    reference = hf_logprobs(policy, encoded, responses, processor.pad_id)
    for mine, theirs in zip(vllm_logprobs(vllm, encoded, responses), reference, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)


@pytest.mark.parametrize("backend", [0, 1], ids=["hf", "vllm"])
def test_sampling_contract(engines, prompts, tiny_model_dir, backend):
    engine = engines[backend]
    _, encoded = prompts
    # Make vision placeholders the likeliest tokens: only suppression keeps them out.
    lm_head = load_file(f"{tiny_model_dir}/model.safetensors")["lm_head.weight"]
    boosted = lm_head.clone()
    generator = torch.Generator().manual_seed(0)
    boosted[engine.suppressed] = (
        lm_head.abs().max() * 50 * torch.randn(len(engine.suppressed), lm_head.shape[1], generator=generator)
    )
    # ...and one stop token likely after some states, so that stopping is exercised whatever the weights.
    boosted[engine.stop_ids[0]] = lm_head.abs().max() * 5 * torch.randn(lm_head.shape[1], generator=generator)
    engine.load_weights([("lm_head.weight", boosted)])
    try:
        groups = engine.generate(encoded, n=4, seed=7)
        assert len(groups) == len(encoded) and all(len(g) == 4 for g in groups)
        stops = set(engine.stop_ids)
        for response in (r for g in groups for r in g):
            assert 1 <= len(response) <= RESPONSE_LENGTH
            assert not stops & set(response[:-1]), "a response runs past its first stop token"
            assert len(response) == RESPONSE_LENGTH or response[-1] in stops
            assert not set(engine.suppressed) & set(response), "a vision placeholder was sampled"
        assert groups == engine.generate(encoded, n=4, seed=7)
        assert groups != engine.generate(encoded, n=4, seed=8)
        assert any(r[-1] in stops for g in groups for r in g)
    finally:
        engine.load_weights([("lm_head.weight", lm_head)])


def test_weight_sync_after_an_update_matches_hf(engines, prompts, learner):
    """One learner update, then the actor's buckets into the engine: vLLM's log-probs equal an HF
    forward of the learner's weights, and differ from the engine's before the sync."""
    _, vllm = engines
    processor, encoded = prompts
    tok = processor.tokenizer
    answers = ["<think>red round</think><answer>red circle<gen_emb>", "blue star", "green square", "yellow"]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    data, prompt_index = build_sequences(encoded[:2], [[ids[0], ids[1]], [ids[2], ids[3]]], processor.pad_id)
    data.union(learner.compute_log_prob(data))
    data.union(learner.compute_ref_log_prob(data))
    data.batch["advantages"] = data.batch["response_mask"] * torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    data.meta_info["seed"] = 0
    learner.update_actor(data)

    before = vllm.generate(encoded, n=1, seed=0, do_sample=False)
    learner.config.rollout.weight_bucket_mb = 0.05  # several buckets even for the tiny model
    sent = list(learner.rollout_weight_buckets())
    assert len(sent) > 1
    names = [name for bucket in sent for name, _ in bucket]
    assert not any(name.startswith("model.visual.") for name in names)  # frozen: never sent
    for bucket in sent:
        vllm.load_weights(bucket)
    after = vllm.generate(encoded, n=1, seed=0, do_sample=False)
    responses = [group[0] for group in after]

    seqs, _ = build_sequences(encoded, [[r] for r in responses], processor.pad_id)
    learner_lp = learner.compute_log_prob(seqs).batch["old_log_probs"]
    reference = [row[: len(r)].tolist() for row, r in zip(learner_lp, responses, strict=True)]
    mine = vllm_logprobs(vllm, encoded, responses)
    for got, want in zip(mine, reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert before != after or any(
        abs(a - b) > 1e-3 for m, r in zip(mine, reference, strict=True) for a, b in zip(m, r, strict=True)
    )


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
