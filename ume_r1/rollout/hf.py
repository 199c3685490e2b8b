"""The `hf` rollout backend: batched sampling with transformers' `generate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ume_r1.data.collate import collate_prompts, mm_token_type_ids
from ume_r1.data.processor import EncodedPrompt
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.rollout.engine import Sampled, special_ids, trim_at_stop


class ChosenLogProbs(LogitsProcessor):
    """Records the log-prob of each sampled token under the sampling distribution. transformers runs a
    caller's processors after its own (suppression) and before the temperature warper, so the scores
    are divided by the temperature here. The token of step t is known at step t + 1 (or at the end), so
    each step keeps its log-softmax table until then: one (batch, vocabulary) table, never one per step."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.table: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            self.steps.append(self.table.gather(1, input_ids[:, -1:]))
        self.table = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, new tokens) log-probs, given the tokens generate returned after the prompt."""
        last = self.table.gather(1, new_tokens[:, len(self.steps) : len(self.steps) + 1])
        return torch.cat([*self.steps, last], dim=1).cpu()


class HFRollout:
    """Samples with `model.generate`. `gathered` is entered around each generate call: the hybrid
    worker passes one that unshards its FSDP actor, so generation reads the actor's own weights."""

    def __init__(
        self,
        model,
        tokenizer,
        config,
        device: torch.device,
        gathered: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.config, self.device, self.gathered = config, device, gathered
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids, self.suppressed = special_ids(
            tokenizer, model.generation_config.eos_token_id, model.config.get_text_config().vocab_size
        )

    @classmethod
    def load(cls, model_path: str, config, device: torch.device, dtype: torch.dtype) -> HFRollout:
        model, tokenizer = load_model(model_path, device, dtype)
        return cls(model.eval(), tokenizer, config, device)

    def generate(
        self, prompts: list[EncodedPrompt], n: int, seed: int, do_sample: bool | None = None
    ) -> list[list[list[int]]]:
        sample = self.config.do_sample if do_sample is None else do_sample
        return self._draw(prompts, n, seed, sample, with_logprobs=False).responses

    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int) -> Sampled:
        return self._draw(prompts, n, seed, bool(self.config.do_sample), with_logprobs=True)

    @torch.no_grad()
    def _draw(
        self, prompts: list[EncodedPrompt], n: int, seed: int, sample: bool, with_logprobs: bool
    ) -> Sampled:
        cfg = self.config
        drawn = n if sample else 1  # greedy: one response, repeated n times
        torch.manual_seed(seed)
        responses: list[list[list[int]]] = []
        logprobs: list[list[list[float]]] = []
        with self.gathered():
            for start in range(0, len(prompts), cfg.micro_batch_size):
                chunk = prompts[start : start + cfg.micro_batch_size]
                batch = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.pad_id).items()}
                types = mm_token_type_ids(
                    batch["input_ids"], self.model.config.image_token_id, self.model.config.video_token_id
                )
                chosen = ChosenLogProbs(cfg.temperature if sample else 1.0)
                sequences = self.model.generate(
                    **batch,
                    mm_token_type_ids=types,
                    do_sample=sample,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=cfg.top_k if cfg.top_k > 0 else None,
                    max_new_tokens=cfg.response_length,
                    num_return_sequences=drawn,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_id,
                    suppress_tokens=self.suppressed,
                    logits_processor=LogitsProcessorList([chosen] if with_logprobs else []),
                )
                new = sequences[:, batch["input_ids"].shape[1] :]
                rows = [trim_at_stop(row, self.stop_ids) for row in new.tolist()]
                values = chosen.finish(new).tolist() if with_logprobs else [[] for _ in rows]
                values = [v[: len(r)] for v, r in zip(values, rows, strict=True)]
                for i in range(len(chunk)):
                    mine = slice(i * drawn, (i + 1) * drawn)
                    responses.append(rows[mine] * (n // drawn))
                    logprobs.append(values[mine] * (n // drawn))
        return Sampled(responses, logprobs)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"rollout weight sync: the hf engine has no parameter {name!r}")
            params[name].copy_(tensor)
