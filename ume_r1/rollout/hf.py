"""The `hf` rollout backend: batched sampling with transformers' `generate`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from ume_r1.data.collate import collate_prompts, mm_token_type_ids
from ume_r1.data.processor import EncodedPrompt
from ume_r1.model.hf_checkpoint import load_model
from ume_r1.rollout.engine import special_ids, trim_at_stop


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

    @torch.no_grad()
    def generate(
        self, prompts: list[EncodedPrompt], n: int, seed: int, do_sample: bool | None = None
    ) -> list[list[list[int]]]:
        cfg = self.config
        sample = cfg.do_sample if do_sample is None else do_sample
        drawn = n if sample else 1  # greedy: one response, repeated n times
        torch.manual_seed(seed)
        out: list[list[list[int]]] = []
        with self.gathered():
            for start in range(0, len(prompts), cfg.micro_batch_size):
                chunk = prompts[start : start + cfg.micro_batch_size]
                batch = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.pad_id).items()}
                types = mm_token_type_ids(
                    batch["input_ids"], self.model.config.image_token_id, self.model.config.video_token_id
                )
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
                )
                new = sequences[:, batch["input_ids"].shape[1] :].tolist()
                responses = [trim_at_stop(row, self.stop_ids) for row in new]
                out.extend(responses[i * drawn : (i + 1) * drawn] * (n // drawn) for i in range(len(chunk)))
        return out

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"rollout weight sync: the hf engine has no parameter {name!r}")
            params[name].copy_(tensor)
