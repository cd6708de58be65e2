"""Turning sampled completions into a padded `TrainBatch`."""
from __future__ import annotations

import torch

from winnow.types import Completion, TrainBatch


def make_train_batch(
    completions: list[Completion],
    advantages: torch.Tensor,
    rewards: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> TrainBatch:
    """Concatenate prompt + response for every completion and right-pad to the longest.

    advantages, rewards: [B] aligned with `completions`. Responses that are empty (max_tokens hit on
    the first step can't happen, but a stop string can end a response at once) get an all-zero mask.
    """
    if len(completions) != len(advantages):
        raise ValueError(f"{len(completions)} completions but {len(advantages)} advantages")
    length = max(len(c.prompt_ids) + len(c.response_ids) for c in completions)
    batch_size = len(completions)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    response_mask = torch.zeros((batch_size, length), dtype=torch.float32)
    engine_logprobs = torch.zeros((batch_size, length), dtype=torch.float32)
    for row, c in enumerate(completions):
        p, r = len(c.prompt_ids), len(c.response_ids)
        input_ids[row, : p + r] = torch.tensor(c.prompt_ids + c.response_ids)
        attention_mask[row, : p + r] = 1
        response_mask[row, p : p + r] = 1.0
        engine_logprobs[row, p : p + r] = torch.tensor(c.logprobs, dtype=torch.float32)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages.float(),
        engine_logprobs=engine_logprobs,
        rewards=None if rewards is None else rewards.float(),
    )


def make_sft_batch(
    pairs: list[tuple[list[int], list[int]]], pad_token_id: int = 0
) -> TrainBatch:
    """A TrainBatch for supervised fine-tuning: loss on the completion tokens of each (prompt, completion)."""
    completions = [
        Completion(prompt_ids=p, response_ids=c, logprobs=[0.0] * len(c), finish_reason="stop", text="")
        for p, c in pairs
    ]
    return make_train_batch(completions, torch.zeros(len(pairs)), pad_token_id=pad_token_id)
