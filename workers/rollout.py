"""Rollout worker: samples G responses per prompt. Backend `hf` (transformers `generate`) runs anywhere.

Each worker holds a full copy of the policy for generation; the controller splits the unique prompts
of a step across workers and pushes the learner's weights after every update.
"""

from __future__ import annotations

import time

import torch
from verl.single_controller.base.decorator import Dispatch, register

from ume_r1.batch import collate_prompts, mm_token_type_ids
from ume_r1.model import load_model, resolve_device, resolve_dtype
from ume_r1.processor import EncodedPrompt
from ume_r1.template import GEN_EMB, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from workers.base import ConfiguredWorker

BACKENDS = ("hf",)


class HFRollout:
    """Batched sampling with transformers; stops at `<gen_emb>` or the end-of-turn token."""

    def __init__(self, model, tokenizer, config, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model, self.tokenizer = model.eval(), tokenizer
        vocab = self.tokenizer.get_vocab()
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        # `<gen_emb>` ends a response; so do the checkpoint's end-of-turn / end-of-text tokens.
        self.stop_ids = list(dict.fromkeys([vocab[GEN_EMB], self.tokenizer.eos_token_id, *eos]))
        # Vision placeholders are filled from pixels; sampling them would corrupt the next forward pass.
        self.suppressed = [vocab[t] for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)]

    @classmethod
    def load(cls, model_path: str, config, device: torch.device, dtype: torch.dtype) -> HFRollout:
        model, tokenizer = load_model(model_path, device, dtype)
        return cls(model, tokenizer, config, device)

    @torch.no_grad()
    def generate(
        self, prompts: list[EncodedPrompt], n: int, seed: int, do_sample: bool | None = None
    ) -> list[list[list[int]]]:
        """G = n responses per prompt; `do_sample` overrides the config (greedy embedding inference)."""
        cfg = self.config
        torch.manual_seed(seed)
        out: list[list[list[int]]] = []
        for start in range(0, len(prompts), cfg.micro_batch_size):
            chunk = prompts[start : start + cfg.micro_batch_size]
            batch = {k: v.to(self.device) for k, v in collate_prompts(chunk, self.pad_id).items()}
            types = mm_token_type_ids(
                batch["input_ids"], self.model.config.image_token_id, self.model.config.video_token_id
            )
            sequences = self.model.generate(
                **batch,
                mm_token_type_ids=types,
                do_sample=cfg.do_sample if do_sample is None else do_sample,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k if cfg.top_k > 0 else None,
                max_new_tokens=cfg.response_length,
                num_return_sequences=n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                suppress_tokens=self.suppressed,
            )
            responses = [self._trim(row) for row in sequences[:, batch["input_ids"].shape[1] :].tolist()]
            out.extend(responses[i * n : (i + 1) * n] for i in range(len(chunk)))
        return out

    def _trim(self, row: list[int]) -> list[int]:
        """Cut after the first stop token (kept); the padding after it is dropped."""
        for i, tok in enumerate(row):
            if tok in self.stop_ids:
                return row[: i + 1]
        return row

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)


class RolloutWorker(ConfiguredWorker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self, model_path: str) -> None:
        cfg = self.config
        if cfg.name not in BACKENDS:
            raise ValueError(f"rollout.name={cfg.name!r} is not a known backend; available: {list(BACKENDS)}")
        device = resolve_device(cfg.device)
        self.engine = HFRollout.load(model_path, cfg, device, resolve_dtype(cfg.dtype, device))

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def generate(self, prompts: list[EncodedPrompt], seed: int) -> dict:
        start = time.perf_counter()
        responses = self.engine.generate(prompts, self.config.n, seed + 1000 * self.rank) if prompts else []
        return {"responses": responses, "seconds": time.perf_counter() - start}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.engine.load_weights(state_dict)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}
