"""The reward contract: `RewardBatch`, everything a reward plugin sees of one GRPO step.

A reward plugin is a file `rewards/<name>.py` defining
`compute_reward(batch: RewardBatch, **kwargs) -> dict[str, torch.Tensor]`; the dict holds "reward" (N,)
and optionally further (N,) components that are logged as metrics (`ume_r1.reward.registry` loads and
checks it). See `rewards/README.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLES = ("query", "target")


@dataclass
class RewardBatch:
    """Everything a reward plugin may use: one entry per response (N) or per prompt (P).

    Responses are grouped by prompt (`prompt_index`); the relation lists hold prompt indices.
    """

    embeddings: torch.Tensor  # (N, D) float, L2-normalised generative embeddings
    responses: list[str]  # N decoded responses (special tokens kept, padding removed)
    prompt_index: torch.Tensor  # (N,) long: the prompt each response was sampled from
    has_gen_emb: torch.Tensor  # (N,) bool: the response contains a <gen_emb> token
    roles: list[str]  # (P,) "query" or "target"
    positives: list[list[int]]  # (P,) prompts relevant to each prompt
    negatives: list[list[int]]  # (P,) explicit negative prompts
    in_batch_negatives: list[list[int]]  # (P,) other examples' prompts of the opposite role

    @property
    def num_prompts(self) -> int:
        return len(self.roles)

    @property
    def num_responses(self) -> int:
        return int(self.embeddings.shape[0])

    def validate(self) -> None:
        """Check shapes, dtypes and indices; raise ValueError naming the offending field."""
        if self.embeddings.ndim != 2 or not self.embeddings.is_floating_point():
            raise ValueError(
                f"embeddings: expected a 2-D float tensor (N, D), got {self.embeddings.dtype} "
                f"of shape {tuple(self.embeddings.shape)}"
            )
        n, p = self.num_responses, self.num_prompts
        if len(self.responses) != n:
            raise ValueError(f"responses: expected {n} texts (one per embedding), got {len(self.responses)}")
        for field, dtype in (("prompt_index", torch.long), ("has_gen_emb", torch.bool)):
            value = getattr(self, field)
            if value.shape != (n,) or value.dtype != dtype:
                raise ValueError(
                    f"{field}: expected a {dtype} tensor of shape ({n},), got {value.dtype} "
                    f"of shape {tuple(value.shape)}"
                )
        if n and (int(self.prompt_index.min()) < 0 or int(self.prompt_index.max()) >= p):
            raise ValueError(f"prompt_index: values must lie in [0, {p}) (num_prompts = len(roles))")
        bad_roles = sorted(set(self.roles) - set(ROLES))
        if bad_roles:
            raise ValueError(f"roles: unknown roles {bad_roles}; expected one of {ROLES}")
        for field in ("positives", "negatives", "in_batch_negatives"):
            lists = getattr(self, field)
            if len(lists) != p:
                raise ValueError(f"{field}: expected {p} lists (one per prompt), got {len(lists)}")
            for prompt, related in enumerate(lists):
                if any(not 0 <= j < p for j in related):
                    raise ValueError(f"{field}[{prompt}]: indices {related} out of range [0, {p})")
                if prompt in related:
                    raise ValueError(f"{field}[{prompt}]: a prompt cannot be related to itself")
        # A prompt that is both positive and negative would make ranking and gap meaningless.
        for prompt, pos in enumerate(self.positives):
            for field in ("negatives", "in_batch_negatives"):
                overlap = set(pos) & set(getattr(self, field)[prompt])
                if overlap:
                    raise ValueError(f"{field}[{prompt}]: {sorted(overlap)} are also in positives[{prompt}]")

    def prompt_mask(self, relation: list[list[int]]) -> torch.Tensor:
        """(P, P) bool: [p, q] is True when q is in relation[p]."""
        mask = torch.zeros(self.num_prompts, self.num_prompts, dtype=torch.bool)
        rows = [p for p, related in enumerate(relation) for _ in related]
        cols = [q for related in relation for q in related]
        mask[rows, cols] = True
        return mask.to(self.embeddings.device)

    def response_mask(self, relation: list[list[int]]) -> torch.Tensor:
        """(N, N) bool: [i, j] is True when response j's prompt is in relation[response i's prompt]."""
        idx = self.prompt_index.to(self.embeddings.device)
        return self.prompt_mask(relation)[idx][:, idx]

    def role_is_query(self) -> torch.Tensor:
        """(N,) bool: the response was sampled from a query prompt."""
        per_prompt = torch.tensor([r == "query" for r in self.roles], dtype=torch.bool)
        return per_prompt.to(self.embeddings.device)[self.prompt_index.to(self.embeddings.device)]
