"""The batch the controller sends the learners: each prompt followed by each of its responses, as a verl
`DataProto` of unpadded rows, padded to a multiple of the learner ranks.

Layout (what `ume_r1.training.micro_batches.pack_rows` reads on the learner):
- `non_tensor_batch["prompt_index"]`: the row's prompt, an index into the step's prompts;
- `non_tensor_batch["response"]`: the row's response tokens (int32, unpadded);
- `batch["response_mask"]`: (rows, longest response); the per-token values the learners return and
  take (old / reference log-probs, advantages) share its width;
- `batch["old_log_probs"]`: absent on on-policy steps (`on_policy`), whose update computes them;
- `meta_info["prompts"]`: the step's encoded prompts (token ids and pixels), or, once `share_prompts`
  has put them into Ray's object store, one reference to them: every learner call of the step then
  passes the reference, and each node fetches the pixels once.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import ray
import torch
from omegaconf import DictConfig
from verl import DataProto
from verl.protocol import pad_dataproto_to_divisor

from ume_r1.data.processor import EncodedPrompt


def build_sequences(
    prompts: list[EncodedPrompt], responses: list[list[list[int]]]
) -> tuple[DataProto, torch.Tensor]:
    """The learner's batch: prompt p followed by each of its responses; returns the prompt index too."""
    prompt_index = torch.tensor([p for p, group in enumerate(responses) for _ in group], dtype=torch.long)
    flat = [np.asarray(r, dtype=np.int32) for group in responses for r in group]
    rows = np.empty(len(flat), dtype=object)
    rows[:] = flat
    lengths = torch.tensor([len(r) for r in flat])
    width = max(1, int(lengths.max())) if len(flat) else 1
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    data = DataProto.from_dict(
        tensors={"response_mask": mask},
        non_tensors={"prompt_index": prompt_index.numpy(), "response": rows},
        meta_info={"prompts": list(prompts)},
    )
    return data, prompt_index


def share_prompts(data: DataProto, shared: ray.ObjectRef | None = None) -> ray.ObjectRef:
    """Swap `data`'s prompts for one object-store reference (`shared`, or a new one of them without the
    resized PIL media, which only rollout engines read) and return it."""
    if shared is None:
        shared = ray.put(learner_prompts(data.meta_info["prompts"]))
    data.meta_info["prompts"] = shared
    return shared


def learner_prompts(prompts: list[EncodedPrompt]) -> list[EncodedPrompt]:
    """What the learners read of the prompts: token ids and pixel tensors (not the PIL copies)."""
    return [replace(p, images=None, video=None) for p in prompts]


def pad_for_ranks(data: DataProto, ranks: int) -> DataProto:
    """Rows padded to a multiple of the learner ranks. Padded rows repeat real ones with a zero
    response mask, which keeps them out of every loss and count."""
    padded, pad = pad_dataproto_to_divisor(data, ranks)
    if pad:
        padded.batch["response_mask"][-pad:] = 0
    return padded


def on_policy(cfg: DictConfig) -> bool:
    """Whether every step's update is on-policy, so that its own forward, detached, gives the old
    log-probs (`actor.recompute_old_log_prob: auto`): one PPO epoch over one mini-batch of the whole
    step, and no group filter (whose dropped rows the update would never see)."""
    actor = cfg.actor
    return (
        actor.recompute_old_log_prob == "auto"
        and actor.ppo_epochs == 1
        and actor.ppo_mini_batch_size is None
        and not cfg.algorithm.filter_groups.enable
    )
