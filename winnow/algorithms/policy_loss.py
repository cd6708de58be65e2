"""The clipped surrogate policy loss (PPO / GRPO / DAPO / RLOO), with truncated importance sampling."""
from __future__ import annotations

from typing import TYPE_CHECKING

from winnow.lazy import lazy_import, no_grad
from winnow.algorithms.aggregation import LossAggregation, aggregate_loss, masked_mean
from winnow.algorithms.kl import kl_estimate

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

LOG_RATIO_CLAMP = 20.0
"""log-ratios are clamped to [-20, 20] before exp (as verl does): float32 exp overflows past ~88, and one
such token would make the loss inf. e^20 ~ 4.9e8 is far outside any clip range, so only a token with a
negative advantage and a ratio above e^20 sees a difference: its loss saturates and its gradient is 0."""


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    engine_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    loss_agg: LossAggregation = "seq-mean-token-mean",
    max_tokens: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss (Schulman et al. 2017, PPO), per token, aggregated by `aggregate_loss`.

        rho_t  = exp(logprobs_t - old_logprobs_t)
        l_t    = -min(rho_t * A, clip(rho_t, 1 - clip_low, 1 + clip_high) * A) * w_t
        w_t    = min(exp(old_logprobs_t - engine_logprobs_t), tis_cap), detached     (TIS; else w_t = 1)
        loss   = aggregate_loss(l, mask, loss_agg, ...)

    clip_low != clip_high is DAPO's clip-higher (Yu et al. 2025: clip_high = 0.28 leaves room for
    low-probability tokens to grow and keeps entropy up).

    Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): the engine that sampled the tokens (vLLM kernels, bf16, another
    parallelism) computes a distribution pi_engine slightly different from the learner's pi_old, so the
    samples are off-policy for the learner. Weighting each token by pi_old / pi_engine corrects for
    that; capping the weight at `tis_cap` bounds its variance. The weight is a constant (detached): it
    reweights the gradient, it is not optimised. Active only when both `engine_logprobs` and `tis_cap`
    are given.

    Args:
        logprobs: `[B, T]` log pi_theta of the sampled tokens, with grad.
        old_logprobs: `[B, T]` log pi_old, the learner's policy when the samples were drawn (no grad).
        advantages: `[B]` one advantage per sequence, broadcast over its tokens; or `[B, T]` one per token
            (PPO with a critic).
        mask: `[B, T]` 1 on response tokens.
        clip_low: epsilon_low, the ratio is clipped below at 1 - clip_low.
        clip_high: epsilon_high, the ratio is clipped above at 1 + clip_high.
        engine_logprobs: `[B, T]` the engine's logprobs of the sampled tokens, for TIS.
        tis_cap: the cap C of the TIS weight; None turns TIS off.
        loss_agg, max_tokens, num_sequences, num_tokens: passed to `aggregate_loss`.

    Returns:
        (loss, metrics). The loss is a 0-dim tensor. The metrics are detached 0-dim tensors, token means
        over the mask, divided by `num_tokens` when given, so that, like the loss, they SUM over the
        micro-batches of a mini-batch to the mini-batch's value:
          clip_fraction       tokens where the clipped term won the min (their gradient is 0)
          clip_fraction_low   ... of which A < 0 and rho < 1 - clip_low
          clip_fraction_high  ... of which A > 0 and rho > 1 + clip_high
          ratio_mean          mean of rho
          approx_kl           k3 estimate of KL(pi_old || pi_theta): mean of (rho - 1) - log rho
                              (Schulman 2020; cleanrl's approx_kl); >= 0, unlike mean(old - new)
          tis_weight_mean     mean of w (only when TIS is on)
    """
    if not (logprobs.dim() == 2 and logprobs.shape == old_logprobs.shape == mask.shape):
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] or [B, T] with [B, T]="
                         f"{tuple(logprobs.shape)}")
    is_tis = engine_logprobs is not None and tis_cap is not None
    if is_tis and engine_logprobs.shape != logprobs.shape:
        raise ValueError(f"engine_logprobs {tuple(engine_logprobs.shape)} must be [B, T] like logprobs")

    is_token = mask != 0  # [B, T]
    # Ratios in float32 even if logprobs are bf16: bf16 has ~3 significant digits, about the size of a
    # clip range. Off the mask the log-ratio is set to 0 before exp, so padding garbage cannot overflow
    # (and gives no NaN gradient through torch.where).
    log_ratio = torch.where(is_token, logprobs.float() - old_logprobs.float(), 0.0)  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
    adv = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(1)  # [B, T] or [B, 1]
    unclipped = ratio * adv  # [B, T]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv  # [B, T]
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]

    metrics: dict[str, Tensor] = {}
    if is_tis:
        engine_log_ratio = torch.where(is_token, old_logprobs.float() - engine_logprobs.float(), 0.0)
        tis_weight = torch.exp(engine_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        tis_weight = tis_weight.clamp(max=tis_cap).detach()  # [B, T]
        per_token = per_token * tis_weight
        metrics["tis_weight_mean"] = masked_mean(tis_weight, mask, num_tokens).detach()

    loss = aggregate_loss(
        per_token, mask, loss_agg, max_tokens=max_tokens, num_sequences=num_sequences, num_tokens=num_tokens
    )

    metrics.update(_ratio_metrics(ratio, adv, logprobs, old_logprobs, mask, clip_low, clip_high, num_tokens))
    return loss, metrics


@no_grad
def _ratio_metrics(ratio, adv, logprobs, old_logprobs, mask, clip_low, clip_high, num_tokens) -> dict[str, Tensor]:
    """Clip fractions, mean ratio and approx KL; token means over the mask (see clipped_policy_loss)."""
    # "Clipping active" = the min picked the clipped term and it differs, i.e. the token's gradient is 0.
    is_clipped_low = (adv < 0) & (ratio < 1.0 - clip_low)  # [B, T]
    is_clipped_high = (adv > 0) & (ratio > 1.0 + clip_high)  # [B, T]
    # KL(pi_old || pi_theta) from samples of pi_old: kl_estimate's (logp, ref_logp) = (old, new), r = rho
    approx_kl = kl_estimate(old_logprobs.float(), logprobs.float(), "k3")  # [B, T]
    return {
        "clip_fraction": masked_mean((is_clipped_low | is_clipped_high).float(), mask, num_tokens),
        "clip_fraction_low": masked_mean(is_clipped_low.float(), mask, num_tokens),
        "clip_fraction_high": masked_mean(is_clipped_high.float(), mask, num_tokens),
        "ratio_mean": masked_mean(ratio, mask, num_tokens),
        "approx_kl": masked_mean(approx_kl, mask, num_tokens),
    }
