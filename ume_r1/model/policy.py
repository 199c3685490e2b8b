"""The learner's forward pass: response log-probs, entropy and the generative embedding, all from one
pass over prompt + response (DESIGN section 3: the old-log-prob forward is where embeddings come from)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ume_r1.data.collate import SharedMedia, mm_token_type_ids


def gen_emb_positions(responses: torch.Tensor, response_mask: torch.Tensor, gen_emb_id: int):
    """Index of the last `<gen_emb>` inside each response, and whether there was one.

    Only response tokens are searched, so the literal tag in the prompt's instruction never counts.
    Without one, the fallback is the response's last token.
    """
    steps = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
    hits = (responses == gen_emb_id) & response_mask.bool()
    last_hit = torch.where(hits, steps, -1).max(dim=1).values
    last_token = (response_mask.sum(dim=1) - 1).clamp(min=0)
    has = last_hit >= 0
    return torch.where(has, last_hit, last_token), has


def hidden_at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row i of the result is hidden[i, index[i]], L2-normalised in fp32."""
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    return F.normalize(picked.float(), dim=-1)


def disc_embeddings(hidden: torch.Tensor, prompt_ids: torch.Tensor, disc_emb_id: int) -> torch.Tensor:
    """Normalised hidden state at the last `<disc_emb>` of each prompt (the template puts exactly one)."""
    steps = torch.arange(prompt_ids.shape[1], device=prompt_ids.device).expand_as(prompt_ids)
    index = torch.where(prompt_ids == disc_emb_id, steps, -1).max(dim=1).values
    if bool((index < 0).any()):
        raise ValueError("a prompt has no <disc_emb> token: was it built with the UME template?")
    return hidden_at(hidden, index)


def _chunk_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the targets and (detached; empty without `with_entropy`) the entropy, from one
    logits matmul."""
    logits = F.linear(hidden, weight).float() / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    if not with_entropy:
        return log_probs, logits.new_empty(0)
    with torch.no_grad():
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return log_probs, entropy


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[target] per position, and (without gradient) the
    entropy of that distribution from the same logits, `chunk_tokens` positions at a time: the fp32
    logits of a whole micro-batch (tokens x vocabulary: 4k x 151,936 is 2.5 GB) never exist at once.
    Under autograd every chunk but the last is checkpointed, so its logits are recomputed in backward
    instead of kept. The last chunk's are kept: backward starts with them, so recomputing them would
    only repeat its matmul (with one chunk, a quarter of the vocabulary's work in an update) at the same
    peak."""
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = flat_targets.numel()
    log_probs, entropies = [], []
    for start in range(0, max(total, 1), chunk_tokens):  # no positions: one empty chunk, still a graph
        h, t = flat_hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens]
        args = (h, weight, t, temperature, with_entropy)
        last = start + chunk_tokens >= total
        if not last and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            chunk, entropy = checkpoint(_chunk_log_probs, *args, use_reentrant=False)
        else:
            chunk, entropy = _chunk_log_probs(*args)
        log_probs.append(chunk)
        entropies.append(entropy)
    entropy = torch.cat(entropies).reshape(shape) if with_entropy else None
    return torch.cat(log_probs).reshape(shape), entropy


class EmbeddingPolicy(nn.Module):
    """Wraps a Qwen2-VL causal LM so one call (and one FSDP root) yields everything the RL step needs."""

    def __init__(
        self,
        model: nn.Module,
        gen_emb_id: int,
        disc_emb_id: int | None = None,
        logit_chunk_tokens: int = 1024,
    ) -> None:
        super().__init__()
        self.model = model
        self.logit_chunk_tokens = logit_chunk_tokens
        self.gen_emb_id = gen_emb_id
        self.disc_emb_id = disc_emb_id
        cfg = model.config
        self.image_pad_id, self.video_pad_id = cfg.image_token_id, cfg.video_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        responses: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = True,
        shared: SharedMedia | None = None,
        with_log_probs: bool = True,
        **media: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`media`: pixel inputs of every row, in row order; or `shared`: those of the distinct
        prompts only, whose vision features are then computed once and reused by all their rows.
        `with_log_probs=False`: the embeddings only, without the vocabulary projection (at the 2B shape
        with few layers, the bulk of a forward's work)."""
        inputs_embeds = None
        if shared is not None:
            inputs_embeds, media = self._embed_shared_media(input_ids, shared)
        out = self.model.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids(input_ids, self.image_pad_id, self.video_pad_id),
            use_cache=False,
            **media,
        )
        width = responses.shape[1]
        hidden = out.last_hidden_state[:, -width:]
        result = {}
        if with_log_probs:
            # token t of the response is predicted by the state one step earlier; only real response
            # tokens go through the vocabulary (padding is zero), so ragged rows cost their own length
            scored = response_mask.bool()
            log_probs, entropy = token_log_probs(
                out.last_hidden_state[:, -width - 1 : -1][scored],
                self.model.lm_head.weight,
                responses[scored],
                temperature,
                self.logit_chunk_tokens,
                with_entropy,
            )
            padded = torch.zeros(responses.shape, dtype=log_probs.dtype, device=log_probs.device)
            result["log_probs"] = padded.masked_scatter(scored, log_probs)
            if with_entropy:
                result["entropy"] = padded.masked_scatter(scored, entropy)
            if self.training and not self._has_pixels(media, shared):
                result["log_probs"] = result["log_probs"] + self._touch_vision_tower()
        index, has = gen_emb_positions(responses, response_mask, self.gen_emb_id)
        result["embeddings"] = hidden_at(hidden, index)
        result["has_gen_emb"] = has
        if self.disc_emb_id is not None:
            result["disc_embeddings"] = disc_embeddings(
                out.last_hidden_state[:, :-width], input_ids[:, :-width], self.disc_emb_id
            )
        return result

    def _embed_shared_media(
        self, input_ids: torch.Tensor, shared: SharedMedia
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token embeddings with each distinct prompt's vision features scattered into all of its
        rows, and the per-row grids (which the 3D positions need)."""
        model = self.model.model
        embeds = model.get_input_embeddings()(input_ids)
        grids = {}
        for pixels, grid_key, counts, features, token_id in (
            (
                "pixel_values",
                "image_grid_thw",
                shared.images_per_prompt,
                model.get_image_features,
                self.image_pad_id,
            ),
            (
                "pixel_values_videos",
                "video_grid_thw",
                shared.videos_per_prompt,
                model.get_video_features,
                self.video_pad_id,
            ),
        ):
            if pixels not in shared.media:
                continue
            items = features(shared.media[pixels], shared.media[grid_key]).pooler_output  # one per item
            bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
            per_prompt = [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
            rows = [p for p in shared.row_prompt if counts[p]]
            row_features = torch.cat([f for p in rows for f in per_prompt[p]])
            grids[grid_key] = torch.cat([shared.media[grid_key][bounds[p] : bounds[p + 1]] for p in rows])
            slots = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
            if slots.sum() != row_features.numel():
                raise ValueError(
                    f"{pixels}: {int(slots.sum()) // embeds.shape[-1]} placeholder tokens in the rows but "
                    f"{row_features.shape[0]} vision features for their prompts"
                )
            embeds = embeds.masked_scatter(slots, row_features.to(embeds.dtype))
        return embeds, grids

    @staticmethod
    def _has_pixels(media: dict, shared: SharedMedia | None) -> bool:
        keys = shared.media if shared is not None else media
        return "pixel_values" in keys or "pixel_values_videos" in keys

    def _touch_vision_tower(self) -> torch.Tensor | float:
        """Zero that depends on every trainable vision parameter: a text-only micro-batch then still
        yields (zero) gradients for them, so all data-parallel ranks reduce the same parameters."""
        params = [p for p in self.model.model.visual.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * 0.0 if params else 0.0
