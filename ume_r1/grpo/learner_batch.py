"""The batch the controller sends the learners: each prompt followed by each of its responses, as a verl
`DataProto`, padded to a multiple of the learner ranks."""

from __future__ import annotations

import numpy as np
import torch
from verl import DataProto
from verl.protocol import pad_dataproto_to_divisor

from ume_r1.data.collate import pack_sequences
from ume_r1.data.processor import EncodedPrompt


def build_sequences(
    prompts: list[EncodedPrompt], responses: list[list[list[int]]], pad_id: int
) -> tuple[DataProto, torch.Tensor]:
    """The learner's batch: prompt p followed by each of its responses; returns the prompt index too."""
    prompt_index = torch.tensor([p for p, group in enumerate(responses) for _ in group], dtype=torch.long)
    per_sequence = [prompts[p] for p in prompt_index.tolist()]
    flat = [r for group in responses for r in group]
    objects = np.empty(len(per_sequence), dtype=object)
    objects[:] = per_sequence
    tensors = pack_sequences(per_sequence, flat, pad_id)
    return DataProto.from_dict(tensors=tensors, non_tensors={"prompt": objects}), prompt_index


def pad_for_ranks(data: DataProto, ranks: int) -> DataProto:
    """Rows padded to a multiple of the learner ranks. Padded rows repeat real ones with a zero
    response mask, which keeps them out of every loss and count."""
    padded, pad = pad_dataproto_to_divisor(data, ranks)
    if pad:
        padded.batch["response_mask"][-pad:] = 0
    return padded
