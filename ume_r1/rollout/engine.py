"""The rollout engine interface: one protocol, two backends (`ume_r1.rollout.hf`, `ume_r1.rollout.vllm`),
used by GRPO (through the Ray workers in `workers/`) and by the evaluation's embedder alike.

    engine = make_engine(rollout_config, model_path, device, dtype)   # ume_r1.rollout.factory
    groups = engine.generate(prompts, n=G, seed=s)        # G response token-id lists per prompt
    sampled = engine.sample(prompts, n=G, seed=s)         # the same draw, with each token's log-prob
    engine.load_weights(named_tensors)                    # in place, any subset of the weights, one pass

Backends: `hf` (transformers `generate`; can also run on a module it is handed, e.g. the FSDP actor's
own weights) and `vllm` (an in-process vLLM engine; the CPU build in tests, the official build on GPU).
Both stop at `<gen_emb>` or the checkpoint's end-of-turn ids (the stop token is kept), never sample a
vision placeholder, cap new tokens at `response_length` and are deterministic by seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from ume_r1.data.processor import EncodedPrompt
from ume_r1.data.template import GEN_EMB, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START


@dataclass
class Sampled:
    """G responses per prompt (token ids, the stop token kept) and the engine's log-prob of each token
    under the distribution it sampled from: the logits with the suppressed ids removed, divided by the
    temperature. The learner's old log-probs are of the same tokens at the same temperature, so the two
    differ only by what the engine's weights differ by (a stale or half-applied sync shows there)."""

    responses: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    # Engines that see their hidden states (hf): each response's generative embedding (the normalised
    # last-layer state at its last `<gen_emb>`, else at its last token) and whether it had one, one row
    # per response in order; the learner's forward then need not compute them.
    embeddings: torch.Tensor | None = None
    has_gen_emb: torch.Tensor | None = None


class RolloutEngine(Protocol):
    stop_ids: list[int]
    suppressed: list[int]

    def generate(
        self, prompts: list[EncodedPrompt], n: int, seed: int, do_sample: bool | None = None
    ) -> list[list[list[int]]]:
        """n responses per prompt; `do_sample=False` is greedy whatever the config says."""

    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int) -> Sampled:
        """n responses per prompt as the config samples them, with their log-probs."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF name, tensor) pairs into the engine's weights in one pass over `weights` (a stream:
        it may be a generator that fetches or gathers as it goes); names not given keep their values."""


def special_ids(
    tokenizer, eos_token_id: int | list[int] | None, vocab_size: int
) -> tuple[list[int], list[int]]:
    """(stop ids, suppressed ids): `<gen_emb>` and the checkpoint's end-of-turn / end-of-text tokens end
    a response. Suppressed: the vision placeholders, which are filled from pixels (sampling one would
    corrupt the next forward pass), and the table's rows past the tokenizer (`vocab_size` rows; a stock
    Qwen2-VL-2B has 277 spare rows), which decode to nothing and were never trained."""
    vocab = tokenizer.get_vocab()
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    stop = list(dict.fromkeys([vocab[GEN_EMB], tokenizer.eos_token_id, *eos]))
    vision = [vocab[t] for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)]
    return stop, vision + list(range(len(tokenizer), vocab_size))


def trim_at_stop(row: list[int], stop_ids: Iterable[int]) -> list[int]:
    """Cut after the first stop token (kept); whatever follows it is dropped."""
    stops = set(stop_ids)
    for i, tok in enumerate(row):
        if tok in stops:
            return row[: i + 1]
    return row
