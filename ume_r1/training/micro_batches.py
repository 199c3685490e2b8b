"""How a learner rank cuts its rows into micro-batches, and trims each to its own longest row.

The driver pads a step's rows to the step's longest prompt (left) and longest response (right). A
forward over that width wastes compute on padding, so every micro-batch is trimmed to the longest
prompt and response among its own rows, and with `use_dynamic_bsz` (verl's name) micro-batches are
filled up to a token budget from rows sorted by length, so long rows do not drag short ones along.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "responses", "response_mask")


def row_lengths(batch: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """Real prompt and response length of every row of a driver batch (prompt left-padded, response
    right-padded, verl's layout)."""
    width = batch["responses"].shape[1]
    prompt = batch["attention_mask"][:, :-width].sum(1)
    return prompt.tolist(), batch["response_mask"].sum(1).tolist()


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


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sequence tensors cut to the longest real prompt and response of these rows (at least one
    response column, so every row has a position to read an embedding from)."""
    width = batch["responses"].shape[1]
    prompt_lens, response_lens = row_lengths(batch)
    keep_prompt, keep_response = max(prompt_lens), max(max(response_lens), 1)
    prompt_end = batch["input_ids"].shape[1] - width
    start, stop = prompt_end - keep_prompt, prompt_end + keep_response
    return {
        "input_ids": batch["input_ids"][:, start:stop],
        "attention_mask": batch["attention_mask"][:, start:stop],
        "responses": batch["responses"][:, :keep_response],
        "response_mask": batch["response_mask"][:, :keep_response],
    }


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token values of trimmed rows, right-padded with zeros back to the batch's response width."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
