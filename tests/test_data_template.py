"""The UME template against DESIGN.md section 4: the user turn's layout and the format check."""

from __future__ import annotations

from ume_r1.data.template import (
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    assistant_text,
    chat_prompt,
    format_ok,
)

# Copied verbatim from DESIGN.md section 4 (not imported, so a drift in the product is caught).
DESIGN_INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input "
    "in a word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)


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
