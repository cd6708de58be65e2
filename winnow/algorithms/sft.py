"""The supervised fine-tuning loss: negative log-likelihood of the completion tokens."""
from __future__ import annotations

from typing import TYPE_CHECKING

from winnow.types import TrainBatch

if TYPE_CHECKING:
    from torch import Tensor


def sft_loss(logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float):
    """Token-mean NLL over the mini-batch's completion tokens (prompt tokens are context, never targets).
    logprobs, batch.response_mask: [B, T]; `num_tokens` is the whole mini-batch's, so micro-batch losses add up.
    `target_tokens` counts the tokens this call trained on: summed over micro-batches and ranks, it is the
    step's (under torchrun, each rank trains only its rows)."""
    nll = -(logprobs * batch.response_mask).sum() / num_tokens
    return nll, {"nll": nll.detach(), "target_tokens": batch.response_mask.sum()}  # on the device
