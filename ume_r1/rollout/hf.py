"""The `hf` rollout backend: batched sampling with transformers' `generate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ume_r1.data.collate import collate_prompts, mm_token_type_ids
from ume_r1.data.processor import EncodedPrompt
from ume_r1.data.template import GEN_EMB
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.model.policy import gen_emb_positions, hidden_at
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


class LastHiddenStates:
    """A forward hook on the text model's final norm while generating: at each call the newest
    position's last-layer state (call 0, the prefill: the prompt's last token; call k: the state at
    response token k - 1, computed when that token is fed back in)."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, module, args, output: torch.Tensor) -> None:
        self.calls.append(output[:, -1].clone())  # clone: the slice would keep the prefill's states alive

    def embeddings(self, responses: list[list[int]], gen_emb_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised state at each response's last `<gen_emb>` (else its last token), and whether it
        had one: what the learner's forward reads at the same position."""
        width = max(1, max(len(r) for r in responses))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in responses])
        mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in responses])[:, None]).long()
        index, has = gen_emb_positions(ids, mask, gen_emb_id)
        states = torch.stack(self.calls, dim=1).cpu()  # (rows, calls, hidden)
        return hidden_at(states, index + 1), has


class StopAfterFed(StoppingCriteria):
    """A row is done one step after it sampled a stop id, once the stop token has been fed through the
    model: its hidden state (the generative embedding at `<gen_emb>`) then exists. `eos_token_id` makes
    generate pad the rows that are done, as its own end-of-sequence criterion does."""

    def __init__(self, stop_ids: list[int], prompt_width: int) -> None:
        self.eos_token_id = torch.tensor(stop_ids)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        fed = input_ids[:, self.prompt_width : -1]
        return torch.isin(fed, self.eos_token_id.to(fed.device)).any(dim=1)


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
        self.gen_emb_id = tokenizer.convert_tokens_to_ids(GEN_EMB)
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
        """With log-probs (`sample`) also the embeddings, when `rollout.return_embeddings`: generation
        then runs one step past each row's stop token (and past the length cap), whose state it reads."""
        cfg = self.config
        drawn = n if sample else 1  # greedy: one response, repeated n times
        embed = with_logprobs and bool(cfg.return_embeddings)
        responses: list[list[list[int]]] = []
        logprobs: list[list[list[float]]] = []
        embedded: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self.gathered():
            for start in range(0, len(prompts), cfg.micro_batch_size):
                chunk = prompts[start : start + cfg.micro_batch_size]
                # a seed per call: its draws do not depend on how many steps the calls before it ran
                torch.manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))
                batch = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.pad_id).items()}
                width = batch["input_ids"].shape[1]
                types = mm_token_type_ids(
                    batch["input_ids"], self.model.config.image_token_id, self.model.config.video_token_id
                )
                chosen = ChosenLogProbs(cfg.temperature if sample else 1.0)
                states = LastHiddenStates()
                stopping = {"eos_token_id": self.stop_ids}
                if embed:
                    hook = self.model.model.language_model.norm.register_forward_hook(states)
                    stop = StoppingCriteriaList([StopAfterFed(self.stop_ids, width)])
                    stopping = {"eos_token_id": None, "stopping_criteria": stop}
                try:
                    sequences = self.model.generate(
                        **batch,
                        mm_token_type_ids=types,
                        do_sample=sample,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        top_k=cfg.top_k if cfg.top_k > 0 else None,
                        max_new_tokens=cfg.response_length + embed,
                        num_return_sequences=drawn,
                        pad_token_id=self.pad_id,
                        suppress_tokens=self.suppressed,
                        logits_processor=LogitsProcessorList([chosen] if with_logprobs else []),
                        **stopping,
                    )
                finally:
                    if embed:
                        hook.remove()
                new = sequences[:, width:]
                rows = [trim_at_stop(row[: cfg.response_length], self.stop_ids) for row in new.tolist()]
                values = chosen.finish(new).tolist() if with_logprobs else [[] for _ in rows]
                values = [v[: len(r)] for v, r in zip(values, rows, strict=True)]
                repeat = n // drawn
                for i in range(len(chunk)):
                    mine = slice(i * drawn, (i + 1) * drawn)
                    responses.append(rows[mine] * repeat)
                    logprobs.append(values[mine] * repeat)
                if embed:
                    order = [
                        i * drawn + j for i in range(len(chunk)) for _ in range(repeat) for j in range(drawn)
                    ]
                    emb, has = states.embeddings(rows, self.gen_emb_id)
                    embedded.append((emb[order], has[order]))
        if not embed:
            return Sampled(responses, logprobs)
        return Sampled(
            responses, logprobs, torch.cat([e for e, _ in embedded]), torch.cat([h for _, h in embedded])
        )

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"rollout weight sync: the hf engine has no parameter {name!r}")
            params[name].copy_(tensor)
