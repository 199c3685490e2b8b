"""The hf rollout backend in this process: G samples per prompt, stop tokens, suppressed vision tokens,
seeded sampling and weight loading."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rl_rows import load_examples
from ume_r1.model.device import resolve_dtype
from ume_r1.rollout.hf import HFRollout


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def rollout(request, tiny_model_dir):
    config = OmegaConf.create(
        {
            "micro_batch_size": 3,
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "response_length": 20,
        }
    )
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
