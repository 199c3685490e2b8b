"""The learner's forward pass: response log-probs, entropy and the generative embedding, all from one
pass over prompt + response (DESIGN section 3: the old-log-prob forward is where embeddings come from)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ume_r1.batch import mm_token_type_ids


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


class EmbeddingPolicy(nn.Module):
    """Wraps a Qwen2-VL causal LM so one call (and one FSDP root) yields everything the RL step needs."""

    def __init__(self, model: nn.Module, gen_emb_id: int, disc_emb_id: int | None = None) -> None:
        super().__init__()
        self.model = model
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
        **media: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        out = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids(input_ids, self.image_pad_id, self.video_pad_id),
            use_cache=False,
            **media,
        )
        width = responses.shape[1]
        hidden = out.last_hidden_state[:, -width:]
        # Token t of the response is predicted by the state one step earlier.
        logits = self.model.lm_head(out.last_hidden_state[:, -width - 1 : -1]).float() / temperature
        log_probs = torch.log_softmax(logits, dim=-1)
        # clone: FSDP2 warns about returning views from the root module
        result = {"log_probs": log_probs.gather(-1, responses.unsqueeze(-1)).squeeze(-1).clone()}
        if with_entropy:
            with torch.no_grad():
                result["entropy"] = -(log_probs.exp() * log_probs).sum(-1)
        if self.training and "pixel_values" not in media and "pixel_values_videos" not in media:
            result["log_probs"] = result["log_probs"] + self._touch_vision_tower()
        index, has = gen_emb_positions(responses, response_mask, self.gen_emb_id)
        result["embeddings"] = hidden_at(hidden, index)
        result["has_gen_emb"] = has
        if self.disc_emb_id is not None:
            result["disc_embeddings"] = disc_embeddings(
                out.last_hidden_state[:, :-width], input_ids[:, :-width], self.disc_emb_id
            )
        return result

    def _touch_vision_tower(self) -> torch.Tensor | float:
        """Zero that depends on every trainable vision parameter: a text-only micro-batch then still
        yields (zero) gradients for them, so all data-parallel ranks reduce the same parameters."""
        params = [p for p in self.model.model.visual.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * 0.0 if params else 0.0
