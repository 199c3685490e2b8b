"""The policy forward against the plain HF forward: the generative embedding at the last <gen_emb> of
the response, and the response tokens' log-probs; on the tiny model and on the Qwen2-VL-2B shape (real
tokenizer, tied table, head size 128, M-RoPE over an image and a video)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image

from ume_r1.data.collate import media_inputs, mm_token_type_ids, pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import Side
from ume_r1.model.policy import EmbeddingPolicy, gen_emb_positions


def _full_forward(model, batch: dict[str, torch.Tensor], media: dict[str, torch.Tensor], processor):
    """The plain HF forward of the whole causal LM, with hidden states."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=mm_token_type_ids(
                batch["input_ids"], processor.image_pad_id, processor.video_pad_id
            ),
            output_hidden_states=True,
            use_cache=False,
            **media,
        )


def test_gen_emb_positions_unit() -> None:
    g, pad = 7, 0
    responses = torch.tensor(
        [
            [3, g, 4, g, 5, pad],  # last <gen_emb> at 3
            [3, 4, 5, 6, g, g],  # last valid token is <gen_emb>; but mask cuts at 5 -> last hit at 4
            [3, 4, 5, g, g, g],  # padding happens to equal the gen_emb id: must be ignored
            [3, 4, 5, pad, pad, pad],  # none -> fallback to last valid token (2)
            [pad, pad, pad, pad, pad, pad],  # empty response -> index 0
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    index, has = gen_emb_positions(responses, mask, g)
    assert index.tolist() == [3, 4, 2, 2, 0]
    assert has.tolist() == [True, True, False, False, False]


@pytest.fixture(params=["tiny", "qwen2_vl_2b"])
def policy_model(request) -> tuple[UMEProcessor, torch.nn.Module]:
    """(processor, model) of the tiny model and of the 2B shape."""
    if request.param == "tiny":
        return request.getfixturevalue("processor"), request.getfixturevalue("model_and_tokenizer")[0]
    return request.getfixturevalue("qwen2_vl")


def _prompts_and_responses(processor: UMEProcessor):
    tok = processor.tokenizer
    prompts = [
        processor.encode(Side("a red circle", images=[random_image(10, 56, 56)])),
        processor.encode(Side("what shape is shown here in the picture", images=[random_image(11, 84, 56)])),
        processor.encode(Side("a blue square")),
        processor.encode(Side("a clip", video=[random_image(12, 56, 56), random_image(13, 56, 56)])),
    ]
    texts = [
        "<think>I see a red circle<gen_emb></think><answer>red circle<gen_emb> and more text",
        "<think>a square</think><answer>square</answer><gen_emb>",
        "<think>no tag here</think><answer>blue square",
        "<think>two frames</think><answer>a clip<gen_emb>",
    ]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return prompts, responses


def test_policy_embedding_is_last_response_gen_emb(policy_model) -> None:
    processor, model = policy_model
    prompts, responses = _prompts_and_responses(processor)
    g = processor.gen_emb_id
    for p in prompts:  # the instruction's literal tag is tokenised as the special token
        assert g in p.input_ids
    assert responses[0].count(g) == 2 and responses[1].count(g) == 1 and g not in responses[2]
    assert len({len(p.input_ids) for p in prompts[:3]}) == 3
    assert prompts[3].pixel_values_videos is not None and prompts[3].video_grid_thw[0, 0] == 1

    batch = pack_sequences(prompts, responses, processor.pad_id)
    media = media_inputs(prompts)
    policy = EmbeddingPolicy(model, g).eval()
    with torch.no_grad():
        out = policy(
            batch["input_ids"], batch["attention_mask"], batch["responses"], batch["response_mask"], **media
        )
    hidden = _full_forward(model, batch, media, processor).hidden_states[-1]

    width = batch["input_ids"].shape[1] - batch["responses"].shape[1]  # prompt block width
    expected_index = []
    for i, resp in enumerate(responses):
        hits = [k for k, t in enumerate(resp) if t == g]
        expected_index.append(hits[-1] if hits else len(resp) - 1)
        assert batch["input_ids"][i, width + expected_index[i]] == (g if hits else resp[-1])
    expected = torch.stack([F.normalize(hidden[i, width + k], dim=-1) for i, k in enumerate(expected_index)])

    assert out["has_gen_emb"].tolist() == [True, True, False, True]
    torch.testing.assert_close(out["embeddings"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["embeddings"].norm(dim=-1), torch.ones(len(prompts)))
    # Not the first response tag, and not any prompt position holding the literal tag.
    first = F.normalize(hidden[0, width + responses[0].index(g)], dim=-1)
    assert not torch.allclose(out["embeddings"][0], first, atol=1e-3)
    for i in range(len(prompts)):
        prompt_tag_positions = (batch["input_ids"][i, :width] == g).nonzero().flatten()
        assert len(prompt_tag_positions) > 0
        for pos in prompt_tag_positions:
            assert not torch.allclose(out["embeddings"][i], F.normalize(hidden[i, pos], dim=-1), atol=1e-3)


def test_policy_log_probs_match_full_model(policy_model) -> None:
    processor, model = policy_model
    prompts, responses = _prompts_and_responses(processor)
    batch = pack_sequences(prompts, responses, processor.pad_id)
    media = media_inputs(prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    assert (batch["response_mask"] == 0).any()  # so is right padding
    temperature = 0.7
    policy = EmbeddingPolicy(model, processor.gen_emb_id).eval()
    with torch.no_grad():
        out = policy(
            batch["input_ids"],
            batch["attention_mask"],
            batch["responses"],
            batch["response_mask"],
            temperature=temperature,
            **media,
        )

    logits = _full_forward(model, batch, media, processor).logits.float()
    width = batch["responses"].shape[1]
    start = batch["input_ids"].shape[1] - width
    mask = batch["response_mask"].bool()
    ref_lp = torch.zeros(batch["responses"].shape)
    ref_ent = torch.zeros(batch["responses"].shape)
    for i in range(len(prompts)):
        for t in range(width):
            row = torch.log_softmax(logits[i, start + t - 1] / temperature, dim=-1)
            ref_lp[i, t] = row[batch["responses"][i, t]]
            ref_ent[i, t] = -(row.exp() * row).sum()
    torch.testing.assert_close(out["log_probs"][mask], ref_lp[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["entropy"][mask], ref_ent[mask], rtol=1e-4, atol=1e-5)
    # padding never goes through the vocabulary: zero there
    assert not out["log_probs"][~mask].any() and not out["entropy"][~mask].any()

    # Padding does not leak: each row alone (no padding at all) gives the same values.
    for i, (prompt, resp) in enumerate(zip(prompts, responses, strict=True)):
        single = pack_sequences([prompt], [resp], processor.pad_id)
        alone = _full_forward(model, single, media_inputs([prompt]), processor).logits.float()
        n, p = len(resp), len(prompt.input_ids)
        want = torch.log_softmax(alone[0, p - 1 : p - 1 + n] / temperature, dim=-1)
        want = want.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out["log_probs"][i, :n], want, rtol=1e-3, atol=1e-4)
