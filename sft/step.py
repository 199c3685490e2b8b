"""One SFT step on this rank's pairs, optionally GradCache-chunked (chunks by a token budget).

GradCache (Gao et al., 2021) lets the contrastive batch be far larger than what fits in memory:
1. embed every sequence in chunks without building graphs;
2. compute the contrastive losses on all embeddings at once, and their gradients w.r.t. the embeddings;
3. re-run each chunk with a graph and back-propagate `embedding . cached_gradient` plus the chunk's
   next-token loss. The parameter gradients equal those of the full-batch step, and the set of
   in-batch negatives is the whole step's, however small the chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from sft.losses import cross_mode_nce, info_nce, token_nll
from ume_r1.data.batch_order import BatchOrder
from ume_r1.data.collate import media_inputs, pack_sequences
from ume_r1.data.files import TooLong
from ume_r1.data.loader import EncodedRows, RowBatch, row_batches
from ume_r1.data.media import MediaLimits
from ume_r1.data.processor import EncodedPrompt, UMEProcessor, load_image_processor
from ume_r1.data.sft_rows import SFTPair
from ume_r1.model.policy import EmbeddingPolicy
from ume_r1.training.micro_batches import plan_micro_batches


@dataclass
class EncodedPairs:
    """2B sequences of this rank: the B queries, then their B positives (row i pairs with B + i)."""

    prompts: list[EncodedPrompt]
    responses: list[list[int]]

    @property
    def num_pairs(self) -> int:
        return len(self.prompts) // 2

    def assistant_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    @classmethod
    def concat(cls, parts: Sequence[EncodedPairs]) -> EncodedPairs:
        """Pairs encoded one by one (`encode_pair`) as one batch: all queries, then all positives."""
        halves = [(p.prompts[: p.num_pairs], p.responses[: p.num_pairs]) for p in parts] + [
            (p.prompts[p.num_pairs :], p.responses[p.num_pairs :]) for p in parts
        ]
        return cls([x for prompts, _ in halves for x in prompts], [x for _, rs in halves for x in rs])


def _fit_reasoning(response: str, budget: int, tokenizer) -> list[int] | None:
    """`response`'s tokens with the end of its <think> text cut until at most `budget` are left (the
    answer and <gen_emb>, what the embedding needs, stay whole); None when even no reasoning is too long."""
    head, sep, rest = response.partition("<think>")
    reasoning, close, tail = rest.partition("</think>")
    reasoning_ids = tokenizer(reasoning, add_special_tokens=False)["input_ids"]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    over = len(ids) - budget
    while over > 0 and reasoning_ids and sep and close:
        reasoning_ids = reasoning_ids[: max(0, len(reasoning_ids) - over)]
        cut = f"{head}{sep}{tokenizer.decode(reasoning_ids)}{close}{tail}"
        ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
        over = len(ids) - budget
    return ids if over <= 0 else None


def encode_pair(
    pair: SFTPair, processor: UMEProcessor, max_length: int, truncate: bool = False
) -> tuple[EncodedPairs, bool]:
    """One pair as model inputs (media decoded here), each side's prompt + response within
    `max_length` tokens. Over it: `TooLong`, or with `truncate` the side's reasoning is cut (then its
    prompt text); returns whether anything was cut."""
    tokenize = processor.tokenizer
    prompts, responses, cut = [], [], False
    for name, side, response in (
        ("query", pair.query, pair.query_response),
        ("positive", pair.positive, pair.positive_response),
    ):
        prompt = processor.encode(side, truncate)
        ids = tokenize(response, add_special_tokens=False)["input_ids"]
        budget = max_length - len(prompt.input_ids)
        if len(ids) > budget:
            fitted = _fit_reasoning(response, budget, tokenize) if truncate else None
            if fitted is None:
                raise TooLong(
                    f"{name}: prompt {len(prompt.input_ids)} + response {len(ids)} tokens, over "
                    f"data.max_length={max_length}{' even with its reasoning cut' if truncate else ''}"
                )
            ids, cut = fitted, True
        prompts.append(prompt)
        responses.append(ids)
        cut = cut or prompt.truncated
    return EncodedPairs(prompts, responses), cut


def sft_processor(tokenizer, path: str, data_cfg) -> UMEProcessor:
    """The processor of SFT rows over `tokenizer`, the one `load_model` returned: a stock checkpoint's
    tokenizer has had the UME tokens added on the way in, in the table's spare rows. A prompt alone may
    fill `data.max_length` (the bound of prompt + response)."""
    return UMEProcessor(
        tokenizer,
        load_image_processor(path, data_cfg.max_pixels),
        data_cfg.max_length,
        MediaLimits.from_config(data_cfg),
    )


def pair_batches(
    pairs: Sequence[SFTPair],
    processor: UMEProcessor,
    data_cfg: Any,
    order: BatchOrder,
    steps: int,
    rank: int = 0,
    world: int = 1,
) -> Iterator[RowBatch]:
    """The next `steps` batches of `order` (this rank's share), encoded in data workers under the
    `data.*` length, bad-row and loader settings (`ume_r1.data.loader`)."""
    truncation = data_cfg.truncation
    encode = partial(
        encode_pair, processor=processor, max_length=data_cfg.max_length, truncate=truncation == "truncate"
    )
    rows = EncodedRows(pairs, encode, data_cfg.on_bad_row, truncation, data_cfg.seed)
    workers, prefetch = data_cfg.dataloader_num_workers, data_cfg.prefetch_factor
    return row_batches(rows, order, steps, workers, prefetch, rank, world)


def encode_pairs(pairs: Sequence[SFTPair], processor: UMEProcessor) -> EncodedPairs:
    """Pairs encoded here and now, within the processor's length limit (evaluation and tests; training
    encodes in data workers, `ume_r1.data.loader`)."""
    return EncodedPairs.concat([encode_pair(p, processor, processor.max_prompt_length)[0] for p in pairs])


def global_token_share(local_tokens: int, device: torch.device) -> float:
    """This rank's share of the step's assistant tokens (global count / world size), so that the
    ranks' token losses average to the global token mean."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return float(local_tokens)
    total = torch.tensor([float(local_tokens)], device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _forward(policy: EmbeddingPolicy, pairs: EncodedPairs, index: Sequence[int], pad_id: int, device):
    prompts = [pairs.prompts[i] for i in index]
    batch = pack_sequences(prompts, [pairs.responses[i] for i in index], pad_id)
    media = media_inputs(prompts)
    batch = {k: v.to(device) for k, v in {**batch, **media}.items()}
    return policy(**batch, with_entropy=False), batch["response_mask"].float()


def _contrastive(disc: torch.Tensor, gen: torch.Tensor, b: int, temperature: float, cross_weight: float):
    """The step's contrastive losses: disc, gen, the cross-mode term (None when its weight is 0), and
    their weighted sum, which is what back-propagates."""
    disc_loss = info_nce(disc[:b], disc[b:], temperature)
    gen_loss = info_nce(gen[:b], gen[b:], temperature)
    total = disc_loss + gen_loss
    cross = None
    if cross_weight:
        cross = cross_mode_nce(disc[:b], gen[:b], disc[b:], gen[b:], temperature)
        total = total + cross_weight * cross
    return disc_loss, gen_loss, cross, total


def gradcache_chunks(pairs: EncodedPairs, max_tokens: int | None, device: torch.device) -> list[list[int]]:
    """This rank's sequences in GradCache chunks: filled up to `max_tokens` padded tokens (rows x (the
    chunk's longest prompt + longest response)) from sequences sorted by length, one over the budget
    alone, so a 12,288-token row pads no short ones (`ume_r1.training.micro_batches`). Every rank runs as
    many chunks as the rank with the most: each forward gathers FSDP shards. None: one chunk."""
    total = 2 * pairs.num_pairs
    if max_tokens is None:
        return [list(range(total))]
    lengths = [len(p.input_ids) for p in pairs.prompts], [len(r) for r in pairs.responses]
    chunks = plan_micro_batches(*lengths, max_tokens=max_tokens)
    most = torch.tensor([len(chunks)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return plan_micro_batches(*lengths, max_tokens=max_tokens, min_count=int(most))


def sft_step(
    policy: EmbeddingPolicy,
    pairs: EncodedPairs,
    pad_id: int,
    device: torch.device,
    temperature: float = 0.02,
    chunk_tokens: int | None = None,
    cross_mode_weight: float = 0.0,
) -> dict[str, float]:
    """Accumulates the gradient of InfoNCE(disc) + InfoNCE(gen) + w * cross-mode InfoNCE + CE into the
    parameters (no optimizer step) and returns the loss parts. `chunk_tokens`: the padded tokens of one
    forward (`gradcache_chunks`); None = all at once. `cross_mode_weight` w: 0 leaves the cross-mode term
    out."""
    b, total = pairs.num_pairs, 2 * pairs.num_pairs
    num_tokens = global_token_share(pairs.assistant_tokens(), device)
    chunks = gradcache_chunks(pairs, chunk_tokens, device)
    if len(chunks) == 1:
        out, mask = _forward(policy, pairs, range(total), pad_id, device)
        disc_loss, gen_loss, cross, contrastive = _contrastive(
            out["disc_embeddings"], out["embeddings"], b, temperature, cross_mode_weight
        )
        ce = token_nll(out["log_probs"], mask, num_tokens)
        (contrastive + ce).backward()
        ce_value = float(ce.detach())
    else:
        with torch.no_grad():
            cached = [_forward(policy, pairs, c, pad_id, device)[0] for c in chunks]
        order = torch.empty(total, dtype=torch.long)  # chunk order -> sequence order
        order[torch.tensor([i for c in chunks for i in c])] = torch.arange(total)
        disc = torch.cat([o["disc_embeddings"] for o in cached])[order.to(device)].requires_grad_()
        gen = torch.cat([o["embeddings"] for o in cached])[order.to(device)].requires_grad_()
        disc_loss, gen_loss, cross, contrastive = _contrastive(disc, gen, b, temperature, cross_mode_weight)
        contrastive.backward()
        ce_value = 0.0
        for chunk in chunks:
            out, mask = _forward(policy, pairs, chunk, pad_id, device)
            rows = torch.as_tensor(chunk, device=device)
            ce = token_nll(out["log_probs"], mask, num_tokens)
            surrogate = (out["disc_embeddings"] * disc.grad[rows]).sum() + (
                out["embeddings"] * gen.grad[rows]
            ).sum()
            (surrogate + ce).backward()
            ce_value += float(ce.detach())
    parts = {
        "loss": float(disc_loss.detach()) + float(gen_loss.detach()) + ce_value,
        "disc_nce": float(disc_loss.detach()),
        "gen_nce": float(gen_loss.detach()),
        "ce": ce_value,
    }
    if cross is not None:
        parts["cross_nce"] = float(cross.detach())
        parts["loss"] += cross_mode_weight * parts["cross_nce"]
    return parts
