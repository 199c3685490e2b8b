"""How a learner rank cuts its rows into micro-batches and packs each to its own longest row.

The driver sends rows unpadded (`ume_r1.grpo.learner_batch`). Every micro-batch is packed to the longest
prompt and response among its own rows, and with `use_dynamic_bsz` (verl's name) micro-batches are
filled up to a token budget from rows sorted by length, so long rows do not drag short ones along.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ume_r1.data.collate import pack_sequences
from ume_r1.data.processor import EncodedPrompt

if TYPE_CHECKING:
    from verl import DataProto


def row_lengths(data: DataProto, prompts: Sequence[EncodedPrompt]) -> tuple[list[int], list[int]]:
    """Prompt and response length of every row (a row padded for ranks has response length 0)."""
    index = data.non_tensor_batch["prompt_index"]
    return [len(prompts[i].input_ids) for i in index], data.batch["response_mask"].sum(1).tolist()


def pack_rows(
    data: DataProto, prompts: Sequence[EncodedPrompt], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[EncodedPrompt]]:
    """The sequences of `data`'s rows, prompt left-padded and response right-padded to these rows' own
    longest (at least one response column, so every row has a position to read an embedding from),
    and each row's prompt. A row whose response mask the driver zeroed keeps a zero mask."""
    rows = [prompts[i] for i in data.non_tensor_batch["prompt_index"]]
    batch = pack_sequences(rows, [r.tolist() for r in data.non_tensor_batch["response"]], pad_id)
    width = batch["responses"].shape[1]
    batch["response_mask"] = batch["response_mask"] * data.batch["response_mask"][:, :width]
    return batch, rows


def plan_micro_batches(
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    rows_per_micro: int | None = None,
    max_tokens: int | None = None,
    min_count: int = 1,
) -> list[list[int]]:
    """Row indices of each micro-batch, at least `min_count` of them (data-parallel ranks must run the
    same number of forwards, so the caller passes the largest count over ranks).

    `max_tokens` (dynamic): rows sorted longest first, each micro-batch filled while its trimmed
    size stays within the budget; a row longer than the budget gets a micro-batch of its own. Else
    consecutive slices of `rows_per_micro` rows (a prompt's G responses stay together, so its vision
    features are computed once)."""
    count = len(prompt_lens)
    if max_tokens is not None:
        order = sorted(range(count), key=lambda i: prompt_lens[i] + response_lens[i], reverse=True)
        groups: list[list[int]] = []
        longest = (0, 0)  # the open group's longest prompt and response, kept as rows join
        for i in order:
            joined = (max(longest[0], prompt_lens[i]), max(longest[1], response_lens[i], 1))
            if groups and (len(groups[-1]) + 1) * sum(joined) <= max_tokens:
                groups[-1].append(i)
                longest = joined
            else:
                groups.append([i])
                longest = (prompt_lens[i], max(response_lens[i], 1))
    else:
        size = max(1, rows_per_micro or count)
        groups = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
    while len(groups) < min(min_count, count):
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        rows = groups.pop(largest)
        groups[largest:largest] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return groups


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token values of trimmed rows, right-padded with zeros back to the batch's response width."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
