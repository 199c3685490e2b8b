"""The `vllm` rollout backend: an in-process vLLM engine (the CPU build in tests, the official build
on GPU), sampling with the same contract as `hf`, weights updated in place.

The engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): weight buckets then
reach it as tensors, with no serialisation, whether it lives in the hybrid worker beside the FSDP
actor or in a standalone rollout worker. Prompts carry one `<|image_pad|>` / `<|video_pad|>` per
image / video plus the pixels as `multi_modal_data`: vLLM runs the checkpoint's processor and
expands the placeholders itself; the expanded ids it reports are checked against ours, so the
learner scores exactly the tokens vLLM conditioned on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from ume_r1.data.processor import EncodedPrompt
from ume_r1.rollout.engine import special_ids, trim_at_stop


def collapse_placeholders(input_ids: list[int], pad_ids: Iterable[int]) -> list[int]:
    """One placeholder per image / video: each run of a pad id becomes a single token."""
    pads, out = set(pad_ids), []
    for tok in input_ids:
        if not (tok in pads and out and out[-1] == tok):
            out.append(tok)
    return out


def engine_environment(config) -> None:
    """Settings vLLM reads from the environment, before its engine starts; a value the user exported
    wins. The engine's private process group binds 127.0.0.1 (it is one process: nothing remote
    needs it); on CPU the KV cache gets `rollout.cpu_kvcache_space_gb`. An in-process engine pins no
    threads (vLLM binds OpenMP threads only when it spawns engine processes): it runs on the torch
    threads the worker was granted."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(config.cpu_kvcache_space_gb)))


class VLLMRollout:
    def __init__(self, model_path: str, config, dtype: torch.dtype) -> None:
        engine_environment(config)
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        if config.tensor_model_parallel_size != 1:
            raise ValueError(
                "rollout.tensor_model_parallel_size > 1 is not supported yet: the in-process engine is "
                "one rank (use more rollout workers, or the hf backend, to scale out)"
            )
        self.config = config
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=int(config.seed),
            max_model_len=config.max_model_len,  # null: the checkpoint's maximum
            enforce_eager=bool(config.enforce_eager),
            gpu_memory_utilization=float(config.gpu_memory_utilization),
            tensor_parallel_size=1,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=int(config.max_num_seqs),
            # Seeded sampling repeats only without chunked prefill (measured on the CPU build).
            enable_chunked_prefill=bool(config.enable_chunked_prefill),
            enable_prefix_caching=bool(config.enable_prefix_caching),
            enable_sleep_mode=self._can_sleep(config),
            limit_mm_per_prompt=dict(config.limit_mm_per_prompt),
        )
        self.tokenizer = self.llm.get_tokenizer()
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        vocab_size = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
        self.stop_ids, self.suppressed = special_ids(self.tokenizer, eos, vocab_size)
        vocab = self.tokenizer.get_vocab()
        self.image_pad_id, self.video_pad_id = vocab["<|image_pad|>"], vocab["<|video_pad|>"]
        self.asleep = False

    @staticmethod
    def _can_sleep(config) -> bool:
        """vLLM's sleep mode (free the KV cache during the update) exists on CUDA only."""
        return bool(config.free_cache_engine) and torch.cuda.is_available()

    def _request(self, prompt: EncodedPrompt) -> dict:
        media = {}
        if prompt.images:
            media["image"] = prompt.images
        if prompt.video:
            media["video"] = np.stack([np.asarray(frame.convert("RGB")) for frame in prompt.video])
        ids = collapse_placeholders(prompt.input_ids, (self.image_pad_id, self.video_pad_id))
        return {"prompt_token_ids": ids, **({"multi_modal_data": media} if media else {})}

    def _sampling(self, n: int, seed: int, do_sample: bool):
        from vllm import SamplingParams

        cfg = self.config
        common = dict(
            max_tokens=int(cfg.response_length),
            stop_token_ids=self.stop_ids,
            logit_bias={tok: float("-inf") for tok in self.suppressed},
            seed=seed,
            detokenize=False,
        )
        if not do_sample:  # vLLM samples greedily once; the n copies are identical anyway
            return SamplingParams(n=1, temperature=0.0, **common)
        return SamplingParams(
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,
            **common,
        )

    def generate(
        self, prompts: list[EncodedPrompt], n: int, seed: int, do_sample: bool | None = None
    ) -> list[list[list[int]]]:
        sample = self.config.do_sample if do_sample is None else do_sample
        self.wake_up()
        params = [self._sampling(n, seed + i, sample) for i in range(len(prompts))]
        outputs = self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)
        groups = []
        for prompt, output in zip(prompts, outputs, strict=True):
            if list(output.prompt_token_ids) != prompt.input_ids:
                raise RuntimeError(
                    f"vLLM expanded a prompt to {len(output.prompt_token_ids)} tokens, the processor to "
                    f"{len(prompt.input_ids)}: the checkpoint's image processor settings (min/max pixels) "
                    "differ from data.max_pixels"
                )
            responses = [trim_at_stop(list(o.token_ids), self.stop_ids) for o in output.outputs]
            groups.append(responses * n if not sample else responses)
        self.sleep()
        return groups

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """In place through the worker's `reload_weights` (plain `load_weights` fails on CPU, where
        weights are repacked for oneDNN). Layers not named keep their weights, so a bucket may hold
        any whole layers. The caches keyed by content (prefix, encoder outputs) are stale after it."""
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache while the learner trains (GPU, `rollout.free_cache_engine`)."""
        if self._can_sleep(self.config) and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
