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
from omegaconf import OmegaConf

from ume_r1.data.processor import EncodedPrompt
from ume_r1.rollout.engine import Sampled, special_ids, trim_at_stop


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


def seeded_requests(config) -> bool:
    """Per-request seeds (`rollout.per_request_seed`): repeatable sampling, which exact resume and the
    tests need, at the price of vLLM's per-request generator path (its own code calls it slow). auto: on
    where there is no GPU (CPU runs and tests), off on CUDA."""
    choice = config.per_request_seed
    return not torch.cuda.is_available() if choice == "auto" else bool(choice)


def chunked_prefill(config) -> bool | None:
    """`rollout.enable_chunked_prefill`; auto: off with seeded requests (they repeat only without it,
    measured on the CPU build), else vLLM's own default (None)."""
    choice = config.enable_chunked_prefill
    if choice == "auto":
        return False if seeded_requests(config) else None
    return bool(choice)


def sleep_level(config, colocated: bool) -> int:
    """0: the engine never sleeps (no CUDA: the CPU build has no sleep mode; or a standalone engine,
    which owns its GPU). In the hybrid worker with `rollout.free_cache_engine`: level 2, which drops
    weights and KV cache, because every sync re-sends every weight anyway (frozen ones too); level 1
    would copy all weights to host memory and back every step only for them to be overwritten."""
    return 2 if colocated and config.free_cache_engine and torch.cuda.is_available() else 0


def refresh_tied_head(worker) -> None:
    """Run inside vLLM's worker after a reload of a tied model. vLLM ties the output head to the
    embedding by sharing the parameter, so a reload updates both; but the layer-wise reload processes
    only the layer that received the tensor (the embedding), and a kernel's own prepared copy of the
    head (the CPU build's prepacked GEMM) would stay stale. Processing the head again rebuilds it (on
    CUDA, where the head is a plain matmul over the shared parameter, it changes nothing)."""
    for module in worker.model_runner.get_model().modules():
        if type(module).__name__ == "ParallelLMHead":
            module.quant_method.process_weights_after_loading(module)


def empty_cache() -> None:
    """Return torch's cached CUDA blocks to the driver, so that vLLM's allocator can take them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMRollout:
    """`colocated`: the engine shares its GPU with the FSDP learner (the hybrid worker), so it sleeps
    while the learner trains (see `sleep_level`)."""

    def __init__(self, model_path: str, config, dtype: torch.dtype, colocated: bool = False) -> None:
        engine_environment(config)
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        if config.tensor_model_parallel_size != 1:
            raise ValueError(
                "rollout.tensor_model_parallel_size > 1 is not supported yet: the in-process engine is "
                "one rank (use more rollout workers, or the hf backend, to scale out)"
            )
        self.config = config
        self.seeded = seeded_requests(config)
        self.sleep_level = sleep_level(config, colocated)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=int(config.seed),
            max_model_len=config.max_model_len,  # null: the checkpoint's maximum
            enforce_eager=bool(config.enforce_eager),
            gpu_memory_utilization=float(config.gpu_memory_utilization),
            tensor_parallel_size=1,
            # null: vLLM's defaults (by device: e.g. 1024 sequences on an H100/H200)
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_chunked_prefill=chunked_prefill(config),
            enable_prefix_caching=bool(config.enable_prefix_caching),
            enable_sleep_mode=self.sleep_level > 0,
            limit_mm_per_prompt=dict(config.limit_mm_per_prompt),
            mm_processor_kwargs=OmegaConf.to_container(config.mm_processor_kwargs, resolve=True),
            # log-probs of the distribution sampled from (temperature, suppressed ids), as the learner's
            logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        hf_config = AutoConfig.from_pretrained(model_path)
        vocab_size = hf_config.get_text_config().vocab_size
        self.tied = bool(hf_config.tie_word_embeddings)
        self.stop_ids, self.suppressed = special_ids(self.tokenizer, eos, vocab_size)
        vocab = self.tokenizer.get_vocab()
        self.image_pad_id, self.video_pad_id = vocab["<|image_pad|>"], vocab["<|video_pad|>"]
        self.asleep = False

    @property
    def resends_all_weights(self) -> bool:
        """Whether a sync must carry frozen weights too (they do not survive sleep level 2)."""
        return self.sleep_level == 2

    @property
    def weights_discarded(self) -> bool:
        """Asleep at level 2: the engine holds no weights until the next `load_weights`."""
        return self.asleep and self.sleep_level == 2

    def _request(self, prompt: EncodedPrompt) -> dict:
        media = {}
        if prompt.images:
            media["image"] = prompt.images
        if prompt.video:
            media["video"] = np.stack([np.asarray(frame.convert("RGB")) for frame in prompt.video])
        ids = collapse_placeholders(prompt.input_ids, (self.image_pad_id, self.video_pad_id))
        return {"prompt_token_ids": ids, **({"multi_modal_data": media} if media else {})}

    def _sampling(self, n: int, seed: int, do_sample: bool, with_logprobs: bool):
        from vllm import SamplingParams

        cfg = self.config
        common = dict(
            max_tokens=int(cfg.response_length),
            stop_token_ids=self.stop_ids,
            logit_bias={tok: float("-inf") for tok in self.suppressed},
            seed=seed if self.seeded else None,
            logprobs=0 if with_logprobs else None,  # 0: the sampled token's only
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
        return self._draw(prompts, n, seed, sample, with_logprobs=False).responses

    def sample(self, prompts: list[EncodedPrompt], n: int, seed: int) -> Sampled:
        return self._draw(prompts, n, seed, bool(self.config.do_sample), with_logprobs=True)

    def _draw(
        self, prompts: list[EncodedPrompt], n: int, seed: int, sample: bool, with_logprobs: bool
    ) -> Sampled:
        self.wake_up()
        params = [self._sampling(n, seed + i, sample, with_logprobs) for i in range(len(prompts))]
        outputs = self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)
        responses, logprobs = [], []
        for prompt, output in zip(prompts, outputs, strict=True):
            if list(output.prompt_token_ids) != prompt.input_ids:
                raise RuntimeError(
                    f"vLLM expanded a prompt to {len(output.prompt_token_ids)} tokens, the processor to "
                    f"{len(prompt.input_ids)}: the checkpoint's image / video processor settings differ "
                    "from data.max_pixels / data.video_* (they reach vLLM as mm_processor_kwargs)"
                )
            rows = [trim_at_stop(list(o.token_ids), self.stop_ids) for o in output.outputs]
            values = [
                # row: a prefix of o.token_ids
                [step[tok].logprob for step, tok in zip(o.logprobs, row, strict=False)]
                if with_logprobs
                else []
                for o, row in zip(output.outputs, rows, strict=True)
            ]
            copies = 1 if sample else n
            responses.append(rows * copies)
            logprobs.append(values * copies)
        self.sleep()
        return Sampled(responses, logprobs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """All of `weights` in one `reload_weights` pass (plain `load_weights` fails on CPU, where weights
        are repacked for oneDNN): vLLM's layer-wise reload is set up once and streams the buckets as
        they come. Layers not named keep their weights, so the stream may hold any whole layers. The
        caches keyed by content (prefix, encoder outputs) are stale after it and are reset, once.
        Asleep, it wakes in verl's order: torch's cached blocks freed, the weights' memory back, the
        load, freed again, then the KV cache back."""
        waking = self.asleep
        if waking:
            empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.tied:
            self.llm.collective_rpc(refresh_tied_head)
        if waking:
            empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache (and at level 2 the weights) while the learner trains."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.weights_discarded:
            raise RuntimeError(
                "the vLLM engine slept at level 2 (weights dropped): load_weights before generating"
            )
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
