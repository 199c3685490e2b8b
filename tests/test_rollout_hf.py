"""The hf rollout backend in this process: G samples per prompt, stop tokens, suppressed vision tokens,
seeded sampling and weight loading; on the 2B shape, the table's rows past the tokenizer are never
sampled even where they would win."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.data.rows import Side
from ume_r1.model.device import resolve_dtype
from ume_r1.rollout.hf import HFRollout

SAMPLING = {"micro_batch_size": 3, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": -1}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def rollout(request, tiny_model_dir):
    config = OmegaConf.create({**SAMPLING, "response_length": 20})
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
        OmegaConf.create({**SAMPLING, "response_length": 8}),
        torch.device("cpu"),
    )
    prompts = [processor.encode(Side("a red circle")), processor.encode(Side("two blue squares"))]
    drawn = {t for group in engine.generate(prompts, n=4, seed=0) for r in group for t in r}
    drawn |= {t for group in engine.generate(prompts, n=1, seed=0, do_sample=False) for r in group for t in r}
    assert drawn and not drawn & set(spare)
