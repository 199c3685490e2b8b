"""Embedding inference: discriminative (one forward, hidden state at `<disc_emb>`) and generative
(generate the reasoning with the rollout backend, then the hidden state at the generated `<gen_emb>`).
A generative pass yields the discriminative embedding too, from the same forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ume_r1.data.collate import collate_prompts, media_inputs, mm_token_type_ids, pack_sequences
from ume_r1.data.processor import UMEProcessor
from ume_r1.data.rows import Side
from ume_r1.data.template import format_ok
from ume_r1.model.policy import EmbeddingPolicy, disc_embeddings
from ume_r1.rollout.factory import make_engine, rollout_config
from ume_r1.rollout.hf import HFRollout


@dataclass
class Embeddings:
    disc: torch.Tensor  # (N, D), L2-normalised
    gen: torch.Tensor | None = None  # (N, D), L2-normalised; None in disc mode
    responses: list[str] | None = None
    has_gen_emb: torch.Tensor | None = None  # (N,) bool

    def format_rate(self) -> float:
        return sum(map(format_ok, self.responses or [])) / max(len(self.responses or []), 1)


class Embedder:
    def __init__(
        self,
        model,
        processor: UMEProcessor,
        device: torch.device,
        batch_size: int = 16,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        rollout: str = "hf",
        model_dir: str | None = None,
    ) -> None:
        """`rollout` is the generation backend: `hf` samples with `model` itself; `vllm` starts an
        engine on `model_dir` (the same weights), and `model` then only embeds."""
        self.processor, self.device, self.batch_size = processor, device, batch_size
        self.model = model.eval()
        self.policy = EmbeddingPolicy(model, processor.gen_emb_id, processor.disc_emb_id)
        # vLLM for evaluation: eager, no sleep mode (nothing trains in between), a 1 GB CPU KV cache.
        config = rollout_config(
            name=rollout,
            device=str(device),
            micro_batch_size=batch_size,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=-1,
            response_length=max_new_tokens,
            enforce_eager=True,
            free_cache_engine=False,
            cpu_kvcache_space_gb=1,
        )
        if rollout == "hf":
            self.rollout = HFRollout(model, processor.tokenizer, config, device)
        elif model_dir is None:
            raise ValueError(f"rollout={rollout!r} loads its own engine: pass model_dir")
        else:
            self.rollout = make_engine(config, model_dir, device, next(model.parameters()).dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def disc(self, sides: list[Side]) -> Embeddings:
        """One forward over each prompt; no generation."""
        out = []
        for start in range(0, len(sides), self.batch_size):
            prompts = [self.processor.encode(s) for s in sides[start : start + self.batch_size]]
            batch = self._to_device(collate_prompts(prompts, self.processor.pad_id))
            types = mm_token_type_ids(
                batch["input_ids"], self.processor.image_pad_id, self.processor.video_pad_id
            )
            hidden = self.model.model(**batch, mm_token_type_ids=types, use_cache=False).last_hidden_state
            out.append(disc_embeddings(hidden, batch["input_ids"], self.processor.disc_emb_id).cpu())
        return Embeddings(disc=torch.cat(out))

    @torch.no_grad()
    def gen(self, sides: list[Side], do_sample: bool = False, n: int = 1, seed: int = 0) -> Embeddings:
        """Greedy by default; with sampling, n responses per side (rows side-major: side i, sample j)."""
        parts: dict[str, list] = {"disc": [], "gen": [], "has": [], "texts": []}
        for start in range(0, len(sides), self.batch_size):
            prompts = [self.processor.encode(s) for s in sides[start : start + self.batch_size]]
            groups = self.rollout.generate(prompts, n=n, seed=seed + start, do_sample=do_sample)
            responses = [r for group in groups for r in group]
            out = self._forward([p for p in prompts for _ in range(n)], responses)
            parts["disc"].append(out["disc_embeddings"].cpu())
            parts["gen"].append(out["embeddings"].cpu())
            parts["has"].append(out["has_gen_emb"].cpu())
            parts["texts"] += self.processor.tokenizer.batch_decode(responses)
        return Embeddings(
            disc=torch.cat(parts["disc"]),
            gen=torch.cat(parts["gen"]),
            responses=parts["texts"],
            has_gen_emb=torch.cat(parts["has"]),
        )

    @torch.no_grad()
    def embed_responses(self, sides: list[Side], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generative embeddings of given response texts, one per side, teacher-forced (no generation):
        (N, D) L2-normalised and (N,) has_gen_emb."""
        gen, has = [], []
        for start in range(0, len(sides), self.batch_size):
            prompts = [self.processor.encode(s) for s in sides[start : start + self.batch_size]]
            texts = responses[start : start + self.batch_size]
            ids = [self.processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            out = self._forward(prompts, ids)
            gen.append(out["embeddings"].cpu())
            has.append(out["has_gen_emb"].cpu())
        return torch.cat(gen), torch.cat(has)

    def _forward(self, prompts: list, responses: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = pack_sequences(prompts, responses, self.processor.pad_id)
        media = media_inputs(prompts)
        return self.policy(**self._to_device(batch), **self._to_device(media), with_entropy=False)
