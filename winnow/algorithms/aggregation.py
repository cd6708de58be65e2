"""Reducing a per-token loss `[B, T]` to the scalar that is back-propagated.

How tokens are weighted is an algorithmic choice, not a detail: GRPO's per-sequence mean gives each token
of a short response more weight than a token of a long one (Liu et al. 2025, "Understanding R1-Zero-like
training", the length bias of Dr. GRPO; Yu et al. 2025, DAPO, token-level loss).

Gradient accumulation. A learner that splits a mini-batch into micro-batches wants the gradient of the
*mini-batch* loss, not the mean of micro-batch means (which over-weights the tokens of a micro-batch
with few tokens). Pass the mini-batch's totals as `num_sequences` / `num_tokens`: they replace the
micro-batch's own denominators, every mode becomes a sum of per-row terms over a fixed constant, and
the micro-batch losses then SUM (do not average them) to exactly the mini-batch loss.
"""
from __future__ import annotations

from typing import Literal, TYPE_CHECKING, get_args

from winnow.lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggregation)
"""the aggregation modes `aggregate_loss` accepts"""


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: LossAggregation | str,
    *,
    max_tokens: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Masked reduction of a per-token loss to a scalar.

        token-mean               = sum_{b,t} l*m / sum_{b,t} m                          (DAPO; PPO in most codebases)
        seq-mean-token-mean      = 1/B * sum_b ( sum_t l*m / sum_t m )                  (GRPO, DeepSeekMath)
        seq-mean-token-sum-norm  = 1/B * sum_b ( sum_t l*m / max_tokens )               (Dr. GRPO, Liu et al. 2025)

    `num_tokens` replaces sum_{b,t} m and `num_sequences` replaces B when given, so that summing the losses
    of the micro-batches of a mini-batch gives exactly the mini-batch's loss (module docstring). Each mode
    reads only the denominators it needs and ignores the others, so a learner can always pass both.
    Note sum_t m in seq-mean-token-mean is per row and never replaced: a row is never split.

    A sequence whose mask is all zero contributes 0 (not NaN) and still counts in B. Positions where
    the mask is 0 are excluded with `torch.where`, not only multiplied by 0, so an inf or NaN there
    (padding) cannot leak into the loss.

    Args:
        per_token: `[B, T]` loss per token.
        mask: `[B, T]` 1 on the tokens that count (response tokens), 0 elsewhere; float, long or bool.
        mode: one of `LOSS_AGG_MODES`.
        max_tokens: the constant normaliser of seq-mean-token-sum-norm: the generation budget
            (`SamplingParams.max_tokens`), the same for every batch. Required by that mode only.
        num_sequences: number of sequences in the whole mini-batch (replaces B).
        num_tokens: number of masked tokens (sum of the mask) in the whole mini-batch.

    Returns:
        The loss, a 0-dim tensor.
    """
    if per_token.dim() != 2 or per_token.shape != mask.shape:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
        )
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode={mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")
    if num_sequences is not None and num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences} must be >= 1")
    if num_tokens is not None and not num_tokens > 0:
        raise ValueError(f"num_tokens={num_tokens} must be > 0")

    mask = mask.to(per_token.dtype)
    masked = torch.where(mask != 0, per_token * mask, torch.zeros_like(per_token))  # [B, T]

    if mode == "token-mean":
        denominator = num_tokens if num_tokens is not None else mask.sum()
        return masked.sum() / _at_least_tiny(denominator, per_token)

    num_sequences = num_sequences if num_sequences is not None else per_token.shape[0]
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(dim=1) / _at_least_tiny(mask.sum(dim=1), per_token)  # [B]
    else:  # seq-mean-token-sum-norm
        if max_tokens is None or max_tokens < 1:
            raise ValueError(
                f"loss aggregation 'seq-mean-token-sum-norm' needs max_tokens >= 1 (the generation budget, "
                f"SamplingParams.max_tokens), got max_tokens={max_tokens}"
            )
        per_sequence = masked.sum(dim=1) / max_tokens  # [B]
    return per_sequence.sum() / num_sequences


def masked_mean(values: Tensor, mask: Tensor, num_tokens: float | None = None) -> Tensor:
    """sum(values * mask) / (num_tokens or sum(mask)); 0 for an empty mask. Same masking as `aggregate_loss`."""
    return aggregate_loss(values, mask, "token-mean", num_tokens=num_tokens)


def _at_least_tiny(denominator: Tensor | float, like: Tensor) -> Tensor:
    # An empty mask has numerator 0 and denominator 0: clamping the denominator to the smallest positive
    # float gives 0 / tiny = 0 instead of NaN and leaves every non-empty denominator (>= 1 token) unchanged.
    denominator = torch.as_tensor(denominator, dtype=like.dtype, device=like.device)
    return denominator.clamp(min=torch.finfo(like.dtype).tiny)
