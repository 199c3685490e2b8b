"""The hf rollout backend in this process: G samples per prompt, stop tokens, suppressed vision tokens,
seeded sampling and weight loading; the generative embeddings it reads off its own hidden states equal
the learner forward's; on the 2B shape, the table's rows past the tokenizer are never sampled even where
they would win."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from ume_r1.data.collate import media_inputs, pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.grpo.learner_batch import build_sequences
from ume_r1.model.device import resolve_dtype
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.rollout.hf import HFRollout

SAMPLING = {"micro_batch_size": 3, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": -1}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def rollout(request, tiny_model_dir):
    config = OmegaConf.create({**SAMPLING, "response_length": 20, "return_embeddings": False})
    device = torch.device(request.param)
    return HFRollout.load(tiny_model_dir, config, device, resolve_dtype("auto", device))


def test_samples_per_prompt_stop_and_suppression(rollout, tiny_model_dir, synthetic_dir):
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(synthetic_dir["train"])
    prompts = [processor.encode(side) for ex in examples[:3] for side in (ex.query, ex.positive)]
    groups = rollout.generate(prompts, n=4, seed=7)
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    stops = set(rollout.stop_ids)
    for response in (r for g in groups for r in g):
        assert 1 <= len(response) <= 20
        assert not stops & set(response[:-1]), "a response runs past its first stop token"
        assert len(response) == 20 or response[-1] in stops
        assert not set(rollout.suppressed) & set(response)
        assert rollout.pad_id not in response[:-1] or rollout.pad_id in stops
    assert groups == rollout.generate(prompts, n=4, seed=7)
    assert groups != rollout.generate(prompts, n=4, seed=8)

    # Loading new weights changes what is sampled under the same seed.
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in rollout.model.state_dict().items()}
    rollout.load_weights(state.items())
    assert groups != rollout.generate(prompts, n=4, seed=7)


# Generation reads each state from the KV-cached decode step, the learner from one forward of the packed
# row: the same fp32 arithmetic in another order.
EMBEDDING_ATOL = 1e-5


def test_embeddings_from_generation_equal_the_learner_forward(tiny_model_dir, synthetic_dir):
    """`rollout.return_embeddings`: the normalised state at each response's last `<gen_emb>` (else its
    last token) as generation computed it, against EmbeddingPolicy's forward over prompt + response, on
    image and text prompts; rows that end at `<gen_emb>`, at the end-of-text id and at the length cap.
    Sampling is unchanged by it (the same seed draws the same responses)."""
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(synthetic_dir["train"])
    prompts = [processor.encode(side) for ex in examples[:2] for side in (ex.query, ex.positive)]
    prompts.append(processor.encode(Side("a red circle")))
    config = OmegaConf.create({**SAMPLING, "response_length": 12, "return_embeddings": True})
    engine = HFRollout.load(tiny_model_dir, config, torch.device("cpu"), torch.float32)
    gen_emb = processor.gen_emb_id
    policy = EmbeddingPolicy(engine.model, gen_emb).eval()
    with torch.no_grad():  # make both stop ids likely: their output rows along the states' mean
        last = pack_sequences(prompts, [[gen_emb]] * len(prompts), processor.pad_id)
        states = policy(**last, **media_inputs(prompts), with_log_probs=False)["embeddings"].mean(0)
        engine.model.lm_head.weight[gen_emb] = states / states.norm() ** 2
        engine.model.lm_head.weight[processor.tokenizer.eos_token_id] = 0.7 * states / states.norm() ** 2
    sampled = engine.sample(prompts, n=4, seed=3)
    rows = [r for group in sampled.responses for r in group]
    ends = {"gen_emb": 0, "stop": 0, "cap": 0}
    for r in rows:
        ends["gen_emb" if r[-1] == gen_emb else "stop" if r[-1] in engine.stop_ids else "cap"] += 1
    assert all(ends.values()), ends  # every way a response ends is in the batch

    repeated = [p for p in prompts for _ in range(4)]
    with torch.no_grad():
        out = policy(
            **pack_sequences(repeated, rows, processor.pad_id), **media_inputs(repeated), with_entropy=False
        )
    assert torch.equal(sampled.has_gen_emb, out["has_gen_emb"])
    assert int(sampled.has_gen_emb.sum()) == ends["gen_emb"]
    torch.testing.assert_close(sampled.embeddings, out["embeddings"], rtol=0, atol=EMBEDDING_ATOL)

    config.return_embeddings = False
    plain = engine.sample(prompts, n=4, seed=3)
    assert plain.responses == sampled.responses and plain.embeddings is None
    torch.testing.assert_close(
        [torch.tensor(v) for g in plain.logprobs for v in g],
        [torch.tensor(v) for g in sampled.logprobs for v in g],
    )


def test_rows_past_the_tokenizer_are_never_sampled(qwen2_vl):
    processor, model = qwen2_vl
    boosted = copy.deepcopy(model)
    spare = list(range(len(processor.tokenizer), boosted.config.get_text_config().vocab_size))
    assert len(spare) == 277
    with torch.no_grad():  # tied table: these rows' logits now dwarf every real token's
        noise = torch.randn(
            len(spare),
            boosted.config.get_text_config().hidden_size,
            generator=torch.Generator().manual_seed(0),
        )
        boosted.get_input_embeddings().weight[spare] = 50 * noise
    engine = HFRollout(
        boosted,
        processor.tokenizer,
        OmegaConf.create({**SAMPLING, "response_length": 8, "return_embeddings": False}),
        torch.device("cpu"),
    )
    prompts = [processor.encode(Side("a red circle")), processor.encode(Side("two blue squares"))]
    drawn = {t for group in engine.generate(prompts, n=4, seed=0) for r in group for t in r}
    drawn |= {t for group in engine.generate(prompts, n=1, seed=0, do_sample=False) for r in group for t in r}
    assert drawn and not drawn & set(spare)


def test_hybrid_generation_runs_without_fsdp_hooks(tiny_model_dir, synthetic_dir, single_rank):
    """`gathered` (the hybrid hf engine generating from the FSDP actor): inside it the decoder layers'
    FSDP forward hooks are off the call path, afterwards they are back, in order, and training forwards
    run through them again; what the actor samples equals what a plain copy of the checkpoint samples."""
    from functools import partial

    from conftest import make_learner

    from ume_r1.training.fsdp import gathered

    learner = make_learner(tiny_model_dir, ["actor.strategy=fsdp2"])  # (auto: one fp32 rank is plain)
    processor = UMEProcessor.from_pretrained(tiny_model_dir)
    examples, _ = load_examples(synthetic_dir["train"])
    prompts = [processor.encode(side) for ex in examples[:2] for side in (ex.query, ex.positive)]
    layers = learner.policy.model.model.language_model.layers
    hooks = lambda: [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in layers]  # noqa: E731
    registered = hooks()
    assert all(pre and post for pre, post in registered)

    config = OmegaConf.create({**SAMPLING, "response_length": 8, "return_embeddings": True})
    rows, _ = build_sequences(prompts, [[[100, 101]]] * len(prompts))
    learner.compute_log_prob(rows)  # FSDP2 initialises itself on the root's first forward
    seen = []

    def in_generation(module, args, output):
        seen.append(all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers))

    norm = learner.policy.model.model.language_model.norm
    probe = norm.register_forward_hook(in_generation)
    actor = HFRollout(
        learner.policy.model,
        processor.tokenizer,
        config,
        torch.device("cpu"),
        partial(gathered, learner.policy),
    )
    learner.policy.eval()
    got = actor.sample(prompts, n=2, seed=4)
    probe.remove()
    assert seen and all(seen)
    assert hooks() == registered
    plain = HFRollout.load(tiny_model_dir, config, torch.device("cpu"), torch.float32).sample(
        prompts, n=2, seed=4
    )
    assert got.responses == plain.responses
    torch.testing.assert_close(got.embeddings, plain.embeddings, rtol=0, atol=EMBEDDING_ATOL)
    assert learner.compute_log_prob(rows).batch["old_log_probs"].shape[0] == len(prompts)  # hooks work again
