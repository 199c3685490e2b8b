"""Core pieces pinned against plain reference computations (DESIGN.md section 4).

Template, tiny model factory, UME token initialisation, processor (images, video, limits), the
generative-embedding index and the learner's forward (log-probs, embeddings), prompt planning and
the step diagnostics.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ume_r1.batch import media_inputs, mm_token_type_ids, pack_sequences
from ume_r1.data import Example, Side
from ume_r1.data_files import TooLong
from ume_r1.grouping import StepPrompts, encode_example, plan_prompts
from ume_r1.model import _train_tiny_tokenizer, add_ume_tokens, build_tiny_model, load_model
from ume_r1.policy import EmbeddingPolicy, gen_emb_positions
from ume_r1.processor import UMEProcessor
from ume_r1.step_metrics import (
    flat_groups,
    in_batch_hit_at_1,
    reasoning_sensitivity,
    reward_group_stats,
    within_group_cosine,
)
from ume_r1.template import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    assistant_text,
    chat_prompt,
    format_ok,
    swap_reasoning,
)

# Copied verbatim from DESIGN.md section 4 (not imported, so a drift in the product is caught).
DESIGN_INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input "
    "in a word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)


def _image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def processor(tiny_model_dir: str) -> UMEProcessor:
    return UMEProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: str):
    model, tokenizer = load_model(tiny_model_dir)
    return model.eval(), tokenizer


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


# ---------------------------------------------------------------------------------------------- template


def test_chat_prompt_instruction_and_media_order() -> None:
    prompt = chat_prompt("INPUT TEXT", num_images=2, has_video=True)
    assert "INPUT TEXT\n<disc_emb>\n" + DESIGN_INSTRUCTION in prompt
    assert prompt.count(f"{VISION_START}{IMAGE_PAD}{VISION_END}") == 2
    assert prompt.count(f"{VISION_START}{VIDEO_PAD}{VISION_END}") == 1
    # Media placeholders come before the text, images before the video.
    text_at = prompt.index("INPUT TEXT")
    assert prompt.rindex(IMAGE_PAD) < prompt.index(VIDEO_PAD) < prompt.rindex(VISION_END) < text_at
    assert prompt.rstrip().endswith("assistant")
    plain = chat_prompt("only text")
    assert VISION_START not in plain and IMAGE_PAD not in plain and VIDEO_PAD not in plain


def test_format_ok_accepts_assistant_text() -> None:
    assert format_ok(assistant_text("I see a red circle.", "a red circle"))
    assert format_ok(assistant_text("multi\nline\nreasoning", "summary"))
    assert format_ok("  <think>r</think>\n<answer>s</answer><gen_emb>\n")
    assert not format_ok("<think>r</think><answer>s</answer>")  # no <gen_emb>
    assert not format_ok("<answer>s<gen_emb>")  # no think block
    assert not format_ok(assistant_text("r", "s") + " trailing words")
    # strict adherence (paper 3.3): each tag once, in order, nothing between </think> and <answer>
    for loose in (
        "<think>r</think><answer><answer>s<gen_emb>",  # what GRPO learnt under the loose pattern
        "<think>r</think><answer>s.<answer>s<gen_emb>",
        "<think>r</think>more words<answer>s<gen_emb>",
        "<think>r<think>r</think><answer>s<gen_emb>",
        "<think>r</think></think><answer>s<gen_emb>",
        "<think>r</think><answer>s</answer></answer><gen_emb>",
        "<think>r</think><answer>s<gen_emb><gen_emb>",
    ):
        assert not format_ok(loose), loose


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_reloads_with_plain_transformers(tiny_model_dir: str) -> None:
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert model.config.get_text_config().hidden_size <= 128
    vocab = tokenizer.get_vocab()
    assert "<disc_emb>" in vocab and "<gen_emb>" in vocab
    for tag in ("<disc_emb>", "<gen_emb>"):
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [vocab[tag]]
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.config.image_token_id == vocab[IMAGE_PAD]
    assert model.config.video_token_id == vocab[VIDEO_PAD]


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = load_file(str(Path(build_tiny_model(tmp_path / "a", seed=0)) / "model.safetensors"))
    b = load_file(str(Path(build_tiny_model(tmp_path / "b", seed=0)) / "model.safetensors"))
    c = load_file(str(Path(build_tiny_model(tmp_path / "c", seed=1)) / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a)


# ---------------------------------------------------------------------------------------------- UME tokens


def test_add_ume_tokens_initialises_from_spelling(tiny_model_dir: str) -> None:
    tokenizer = _train_tiny_tokenizer(512, [])
    assert "<disc_emb>" not in tokenizer.get_vocab() and "<gen_emb>" not in tokenizer.get_vocab()
    config = Qwen2VLConfig.from_pretrained(tiny_model_dir)
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    assert not model.config.tie_word_embeddings
    n = len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == n

    spellings = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("<disc_emb>", "<gen_emb>")}
    assert all(len(ids) > 1 for ids in spellings.values())
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    expected = {
        t: (old_in[ids].sum(0) / len(ids), old_out[ids].sum(0) / len(ids)) for t, ids in spellings.items()
    }

    ids = add_ume_tokens(model, tokenizer)
    assert sorted(ids.values()) == [n, n + 1]
    assert len(tokenizer) == n + 2
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    grown = -(-(n + 2) // 128) * 128  # grows only because it must, to a multiple of 128
    assert new_in.shape[0] == grown and new_out.shape[0] == grown
    for tag, (want_in, want_out) in expected.items():
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [ids[tag]]
        torch.testing.assert_close(new_in[ids[tag]], want_in, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new_out[ids[tag]], want_out, rtol=1e-6, atol=1e-7)
    # Existing rows are untouched.
    assert torch.equal(new_in[:n], old_in) and torch.equal(new_out[:n], old_out)

    # A second call changes nothing.
    snapshot_in, snapshot_out = new_in.clone(), new_out.clone()
    assert add_ume_tokens(model, tokenizer) == ids
    assert len(tokenizer) == n + 2
    assert torch.equal(model.get_input_embeddings().weight.detach(), snapshot_in)
    assert torch.equal(model.get_output_embeddings().weight.detach(), snapshot_out)


def test_add_ume_tokens_uses_spare_rows_and_never_shrinks(tiny_model_dir: str) -> None:
    """A stock Qwen2-VL table is larger than its tokenizer: the new tokens take spare rows and the
    table keeps its size (shrinking it breaks tensor-parallel vocabulary sharding)."""
    tokenizer = _train_tiny_tokenizer(512, [])
    n = len(tokenizer)
    config = Qwen2VLConfig.from_pretrained(tiny_model_dir)
    config.text_config.vocab_size = n + 300
    model = Qwen2VLForConditionalGeneration(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    spelling = tokenizer("<gen_emb>", add_special_tokens=False)["input_ids"]
    ids = add_ume_tokens(model, tokenizer)
    new_in = model.get_input_embeddings().weight.detach()
    assert new_in.shape[0] == n + 300 and model.get_output_embeddings().weight.shape[0] == n + 300
    assert sorted(ids.values()) == [n, n + 1]
    torch.testing.assert_close(new_in[ids["<gen_emb>"]], old_in[spelling].mean(0))
    assert torch.equal(new_in[n + 2 :], old_in[n + 2 :])


def test_load_model_refuses_non_local_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads from a hub"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model("Qwen/Qwen2-VL-2B-Instruct")


def test_processor_rejects_tokenizer_without_gen_emb(tiny_model_dir: str, tmp_path: Path) -> None:
    shutil.copy(Path(tiny_model_dir) / "config.json", tmp_path / "config.json")
    tokenizer = _train_tiny_tokenizer(512, [])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<disc_emb>"]})
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<gen_emb>"):
        UMEProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- processor


def test_encode_image_side(processor: UMEProcessor) -> None:
    images = [_image(0, 56, 56), _image(1, 84, 40)]
    encoded = processor.encode(Side("a red circle", images=images))
    merge = processor.image_processor.merge_size
    grid = encoded.image_grid_thw
    assert grid.shape == (2, 3)
    assert encoded.input_ids.count(processor.image_pad_id) == int(grid.prod(-1).sum()) // merge**2
    assert encoded.pixel_values.shape[0] == int(grid.prod(-1).sum())
    assert encoded.pixel_values_videos is None and encoded.video_grid_thw is None
    # The image pads sit in two runs, one per image, sized by that image's grid.
    ids = encoded.input_ids
    start = processor.tokenizer.convert_tokens_to_ids(VISION_START)
    runs = []
    for i, tok in enumerate(ids):
        if tok == start:
            j = i + 1
            while ids[j] == processor.image_pad_id:
                j += 1
            runs.append(j - i - 1)
    assert runs == (grid.prod(-1) // merge**2).tolist()
    assert processor.disc_emb_id in ids


def test_encode_text_side_has_no_pixels(processor: UMEProcessor) -> None:
    encoded = processor.encode(Side("just some text"))
    assert encoded.pixel_values is None and encoded.image_grid_thw is None
    assert encoded.pixel_values_videos is None and encoded.video_grid_thw is None
    assert processor.image_pad_id not in encoded.input_ids
    assert processor.video_pad_id not in encoded.input_ids
    assert media_inputs([encoded]) == {}


def test_encode_too_long_prompt_raises(processor: UMEProcessor) -> None:
    short = UMEProcessor(processor.tokenizer, processor.image_processor, max_prompt_length=10)
    with pytest.raises(TooLong, match=r"data\.max_prompt_length"):
        short.encode(Side("hello"))


def test_video_patches_match_image_processor(processor: UMEProcessor) -> None:
    frame = _image(3, 70, 42)
    image = processor.image_processor(images=[frame], return_tensors="pt")
    pixels, grid = processor.video_patches([frame, frame.copy()])
    assert grid.tolist() == [[1, *image["image_grid_thw"][0, 1:].tolist()]]
    assert image["image_grid_thw"][0, 0] == 1
    torch.testing.assert_close(pixels, image["pixel_values"].float(), rtol=0, atol=1e-5)

    _, grid3 = processor.video_patches([frame, _image(4, 70, 42), _image(5, 70, 42)])
    assert grid3[0, 0].item() == 2 and grid3[0, 1:].tolist() == grid[0, 1:].tolist()

    encoded = processor.encode(Side("a video", video=[frame, frame]))
    merge = processor.image_processor.merge_size
    assert encoded.input_ids.count(processor.video_pad_id) == int(encoded.video_grid_thw.prod()) // merge**2
    assert encoded.pixel_values is None


# ---------------------------------------------------------------------------------------------- gen_emb index


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


def _prompts_and_responses(processor: UMEProcessor):
    tok = processor.tokenizer
    prompts = [
        processor.encode(Side("a red circle", images=[_image(10, 56, 56)])),
        processor.encode(Side("what shape is shown here in the picture", images=[_image(11, 84, 56)])),
        processor.encode(Side("a blue square")),
    ]
    texts = [
        "<think>I see a red circle<gen_emb></think><answer>red circle<gen_emb> and more text",
        "<think>a square</think><answer>square</answer><gen_emb>",
        "<think>no tag here</think><answer>blue square",
    ]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return prompts, responses


def test_policy_embedding_is_last_response_gen_emb(processor: UMEProcessor, model_and_tokenizer) -> None:
    model, _ = model_and_tokenizer
    prompts, responses = _prompts_and_responses(processor)
    g = processor.gen_emb_id
    for p in prompts:  # the instruction's literal tag is tokenised as the special token
        assert g in p.input_ids
    assert responses[0].count(g) == 2 and responses[1].count(g) == 1 and g not in responses[2]
    assert len({len(p.input_ids) for p in prompts}) == 3

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

    assert out["has_gen_emb"].tolist() == [True, True, False]
    torch.testing.assert_close(out["embeddings"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["embeddings"].norm(dim=-1), torch.ones(3))
    # Not the first response tag, and not any prompt position holding the literal tag.
    first = F.normalize(hidden[0, width + responses[0].index(g)], dim=-1)
    assert not torch.allclose(out["embeddings"][0], first, atol=1e-3)
    for i in range(3):
        prompt_tag_positions = (batch["input_ids"][i, :width] == g).nonzero().flatten()
        assert len(prompt_tag_positions) > 0
        for pos in prompt_tag_positions:
            assert not torch.allclose(out["embeddings"][i], F.normalize(hidden[i, pos], dim=-1), atol=1e-3)


def test_policy_log_probs_match_full_model(processor: UMEProcessor, model_and_tokenizer) -> None:
    model, _ = model_and_tokenizer
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

    # Padding does not leak: each row alone (no padding at all) gives the same values.
    for i, (prompt, resp) in enumerate(zip(prompts, responses, strict=True)):
        single = pack_sequences([prompt], [resp], processor.pad_id)
        alone = _full_forward(model, single, media_inputs([prompt]), processor).logits.float()
        n, p = len(resp), len(prompt.input_ids)
        want = torch.log_softmax(alone[0, p - 1 : p - 1 + n] / temperature, dim=-1)
        want = want.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out["log_probs"][i, :n], want, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_prompts_relations(processor: UMEProcessor) -> None:
    examples = [
        Example(Side("q0"), Side("target A"), [Side("target B")], "t", 0),
        Example(Side("q1"), Side("target A"), [Side("target C")], "t", 1),
        Example(Side("q2"), Side("target B"), [], "t", 2),
    ]
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples])
    # q0=0, A=1, B=2, q1=3, C=4, q2=5: A shared by q0 and q1 is generated once.
    assert plan.roles == ["query", "target", "target", "query", "target", "query"]
    assert plan.query_of_example == [0, 3, 5]
    assert plan.positive_of_example == [1, 1, 2]
    assert plan.prompts[1].input_ids == processor.encode(Side("target A")).input_ids
    assert plan.prompts[4].input_ids == processor.encode(Side("target C")).input_ids

    q0, a, b, q1, c, q2 = range(6)
    assert plan.positives[q0] == [a] and plan.negatives[q0] == [b] and plan.in_batch_negatives[q0] == [c]
    assert plan.positives[q1] == [a] and plan.negatives[q1] == [c] and plan.in_batch_negatives[q1] == [b]
    assert plan.positives[q2] == [b] and plan.negatives[q2] == [] and plan.in_batch_negatives[q2] == [a, c]
    # Targets: symmetric relations.
    assert plan.positives[a] == [q0, q1] and plan.negatives[a] == [] and plan.in_batch_negatives[a] == [q2]
    assert plan.positives[b] == [q2] and plan.negatives[b] == [q0] and plan.in_batch_negatives[b] == [q1]
    assert plan.positives[c] == [] and plan.negatives[c] == [q1] and plan.in_batch_negatives[c] == [q0, q2]
    # No prompt is ever both related and an in-batch negative of another.
    for i in range(6):
        related = set(plan.positives[i]) | set(plan.negatives[i])
        assert not related & set(plan.in_batch_negatives[i])


def test_plan_prompts_drops_negative_equal_to_positive(processor: UMEProcessor) -> None:
    examples = [Example(Side("q"), Side("same"), [Side("same"), Side("other"), Side("other")], "t", 0)]
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples])
    assert plan.roles == ["query", "target", "target"]
    assert plan.positives[0] == [1] and plan.negatives[0] == [2] and plan.in_batch_negatives[0] == []


# ---------------------------------------------------------------------------------------------- metrics


def test_flat_groups_and_reward_variance_shares() -> None:
    # 3 prompts x 2 responses: prompt 0 all equal (format and embedding), 1 differs in format only,
    # 2 in embedding only; a prompt of one response is flat by definition
    fmt = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    emb = torch.tensor([0.2, 0.2, 0.1, 0.1, 0.0, 0.4, 0.3])
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert flat_groups(fmt + emb, prompt_index).tolist() == [True, False, False, True]
    stats = reward_group_stats({"reward": fmt + emb, "format": fmt, "embedding": emb}, prompt_index)
    # population variances per prompt: format 0, .25, 0, 0; embedding 0, 0, .04, 0
    assert stats["reward/zero_variance_groups"] == 0.5
    assert stats["reward/format_variance_share"] == pytest.approx(0.25 / (0.25 + 0.04))
    assert stats["reward/group_std"] == pytest.approx((0 + 0.5 + 0.2 + 0) / 4)
    # format_weight 0.1: the format term's variances shrink 100-fold
    weighted = reward_group_stats({"reward": 0.1 * fmt + emb, "format": fmt, "embedding": emb}, prompt_index)
    assert weighted["reward/format_variance_share"] == pytest.approx(0.0025 / (0.0025 + 0.04))


def test_reasoning_sensitivity_hand_made() -> None:
    assert swap_reasoning("<think>mine</think><answer>a<gen_emb>", "x<think>theirs</think>y") == (
        "<think>theirs</think><answer>a<gen_emb>"
    )
    assert swap_reasoning("no tags", "<think>t</think>") is None
    own = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    swapped = torch.tensor([[1.0, 1.0], [0.0, -1.0], [3.0, 4.0]])
    # cosines: 1/sqrt(2), -1, and a row left out (e.g. its response had no <think>)
    got = reasoning_sensitivity(own, swapped, torch.tensor([True, True, False]))
    assert got == pytest.approx((2**-0.5 - 1) / 2)
    assert math.isnan(reasoning_sensitivity(own, swapped, torch.tensor([False, False, False])))


def test_step_metrics_hand_computed() -> None:
    plan = StepPrompts(
        roles=["query", "target", "query", "target"], query_of_example=[0, 2], positive_of_example=[1, 3]
    )
    embeddings = torch.tensor(
        [
            [1.0, 0.0],  # query 0: nearest centre (1, 0) = its positive -> hit
            [0.6, 0.8],  # query 0: 0.6 vs 0.8 -> target 3 -> miss
            [0.8, 0.6],  # target 1: mean (0.8, 0) -> centre (1, 0)
            [0.8, -0.6],
            [0.0, 1.0],  # query 2: hit
            [-0.6, 0.8],  # query 2: -0.6 vs 0.8 -> hit
            [0.0, 1.0],  # target 3: centre (0, 1)
            [0.0, 1.0],
        ]
    )
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert in_batch_hit_at_1(embeddings, prompt_index, plan) == pytest.approx(3 / 4)
    # Pairwise cosines per prompt: 0.6, 0.64 - 0.36 = 0.28, 0.8, 1.0.
    assert within_group_cosine(embeddings, prompt_index) == pytest.approx((0.6 + 0.28 + 0.8 + 1.0) / 4)
    # A prompt with a single response has no pair and is left out of the average.
    single = torch.cat([embeddings, torch.tensor([[1.0, 0.0]])])
    assert within_group_cosine(single, torch.cat([prompt_index, torch.tensor([4])])) == pytest.approx(0.67)


def test_step_metrics_three_responses_per_group() -> None:
    # G=3: mean over the 6 ordered off-diagonal pairs.
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    s = 2**-0.5
    assert within_group_cosine(e, torch.tensor([7, 7, 7])) == pytest.approx(2 * (s + 0.0 + s) / 6)


def test_synthetic_fixture_loads(synthetic_dir: dict[str, str], processor: UMEProcessor) -> None:
    from ume_r1.data import load_examples

    examples, report = load_examples(synthetic_dir["train"])
    assert report.loaded == 48 and len(examples) == 48
    plan = plan_prompts([encode_example(e, processor)[0] for e in examples[:6]])
    assert plan.roles.count("query") == 6
    for prompt, role in zip(plan.prompts, plan.roles, strict=True):
        assert processor.disc_emb_id in prompt.input_ids, role
