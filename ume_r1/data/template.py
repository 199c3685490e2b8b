"""The UME-R1 prompt template, special tokens and response format (paper section 3.2)."""

from __future__ import annotations

import re

DISC_EMB = "<disc_emb>"
GEN_EMB = "<gen_emb>"
UME_TOKENS = (DISC_EMB, GEN_EMB)

INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input "
    "in a word or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)

SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL chat markup; vision placeholders are expanded by the processor.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>", GEN_EMB)
_FREE = "(?:(?!" + "|".join(re.escape(t) for t in TAGS) + ").)*"  # text holding none of the tags
# Each tag once, in order; only white space between </think> and <answer>; </answer> optional.
FORMAT_RE = re.compile(
    rf"<think>{_FREE}</think>\s*<answer>{_FREE}(?:</answer>)?\s*{re.escape(GEN_EMB)}", re.DOTALL
)


def user_text(text: str) -> str:
    """The user turn's text part: input text, then `<disc_emb>`, then the instruction."""
    return f"{text}\n{DISC_EMB}\n{INSTRUCTION}"


def assistant_text(reasoning: str, summary: str) -> str:
    """A well-formed assistant turn (used by SFT data and tests)."""
    return f"<think>{reasoning}</think><answer>{summary}{GEN_EMB}"


def chat_prompt(text: str, num_images: int = 0, has_video: bool = False) -> str:
    """The full generation prompt in Qwen2-VL chat markup; media first, then text.

    Each image / video appears as one pad token that the processor expands to its patch count.
    """
    media = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
    if has_video:
        media += f"{VISION_START}{VIDEO_PAD}{VISION_END}"
    return (
        f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
        f"{IM_START}user\n{media}{user_text(text)}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def format_ok(response: str) -> bool:
    """Format reward predicate (paper 3.3: 1 for strict adherence to the template, else 0): the whole
    response is `<think>..</think><answer>..<gen_emb>`, each tag exactly once and in that order.

    A `</answer>` before `<gen_emb>` and white space around the tags are allowed. Anything else is a
    deviation: a repeated tag (`<answer><answer>`, which GRPO learnt to emit under the earlier, looser
    pattern), text between `</think>` and `<answer>`, a tag inside the reasoning or the summary.
    """
    return FORMAT_RE.fullmatch(response.strip()) is not None


def swap_reasoning(response: str, donor: str) -> str | None:
    """`response` with the text of its first <think> block replaced by `donor`'s: the probe of whether an
    embedding depends on its reasoning. None when either has no <think>..</think>."""
    own, other = THINK_RE.search(response), THINK_RE.search(donor)
    if own is None or other is None:
        return None
    return f"{response[: own.start(1)]}{other.group(1)}{response[own.end(1) :]}"
