"""PPO with a critic (Schulman et al. 2017), in the classic RLHF form (Ziegler et al. 2019; Ouyang et al.
2022, InstructGPT): per-token rewards, a learned value model, GAE, whitened advantages, the clipped
surrogate for the policy and a clipped value loss for the critic.

A critic objective declares `needs_critic = True` and has one more member, `value_loss`; the RL loop
calls them in this order every policy iteration:

    batch.old_logprobs, batch.ref_logprobs (if needs_reference), batch.old_values = ...   # filled by the loop
    result = objective.advantages(batch)     # per-token advantages and returns, [B, T] each
    for each epoch and mini-batch:
        policy step on objective.loss(logprobs, mini_batch, ...)
        critic step on objective.value_loss(values, mini_batch, ...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TYPE_CHECKING

from winnow.lazy import lazy_import, no_grad
from winnow.algorithms.advantages import Advantages
from winnow.algorithms.aggregation import LOSS_AGG_MODES, LossAggregation, masked_mean
from winnow.algorithms.gae import clipped_value_loss, explained_variance, gae_advantages, token_rewards, whiten
from winnow.algorithms.kl import kl_estimate
from winnow.algorithms.policy_loss import clipped_policy_loss
from winnow.types import TrainBatch

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")


@dataclass
class PPO:
    """PPO with a critic: a value model (a copy of the policy's backbone with a scalar head, its own
    optimizer), per-token GAE(gamma, lambda) advantages, whitened, the clipped surrogate and PPO's clipped
    value loss. Works with one sample per prompt (the critic is the baseline) or several."""

    name: ClassVar[str] = "ppo"
    uses_group_baseline: ClassVar[bool] = False
    """the critic is the baseline: every scored sample is kept, groups of one included"""
    needs_critic: ClassVar[bool] = True
    """the loop builds a critic, values the batch before `advantages` and steps it on `value_loss`"""

    gamma: float = 1.0
    """discount per token in GAE (1: the reward at the end counts fully at every token)"""
    lam: float = 0.95
    """GAE's lambda: 1 is Monte Carlo returns minus V (unbiased, noisy), 0 is one-step TD (leans on the critic)"""
    clip_low: float = 0.2
    """epsilon_low: the ratio pi/pi_old is clipped below at 1 - clip_low"""
    clip_high: float = 0.2
    """epsilon_high: the ratio is clipped above at 1 + clip_high"""
    value_clip: float | None = 0.2
    """the critic's new values are clipped to old value +- value_clip in the value loss (reward units); None: no clip"""
    whiten_advantages: bool = True
    """normalise the batch's per-token advantages to mean 0, std 1 (over all response tokens of the batch)"""
    kl_coef: float = 0.0
    """beta of the per-token KL penalty to the reference, in the *reward*: r_t -= beta (log pi_old - log pi_ref)"""
    critic_lr: float = 1e-5
    """the critic's AdamW learning rate (its other optimizer settings are the learner's)"""
    tis_cap: float | None = 2.0
    """cap on the truncated importance weight pi_old/pi_engine per token; None turns the correction off"""
    loss_agg: LossAggregation = "token-mean"
    """how the policy's token losses become one number (the value loss is always token-mean)"""

    # No vf_coef: the critic is a separate model with its own AdamW, and Adam's step does not change when
    # the loss is scaled, so a value-loss weight would only interact with gradient clipping; `critic_lr`
    # is the knob that sets how fast the critic moves.

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.gamma <= 1:
            problems.append(f"gamma={self.gamma} must be in [0, 1]")
        if not 0 <= self.lam <= 1:
            problems.append(f"lam={self.lam} must be in [0, 1]")
        if self.clip_low < 0 or self.clip_high < 0:
            problems.append(f"clip_low={self.clip_low} and clip_high={self.clip_high} must be >= 0")
        if self.value_clip is not None and not self.value_clip > 0:
            problems.append(f"value_clip={self.value_clip} must be > 0, or None for no clipping")
        if not self.kl_coef >= 0:
            problems.append(f"kl_coef={self.kl_coef} must be >= 0")
        if not self.critic_lr > 0:
            problems.append(f"critic_lr={self.critic_lr} must be > 0")
        if self.tis_cap is not None and not self.tis_cap > 0:
            problems.append(f"tis_cap={self.tis_cap} must be > 0, or None to turn TIS off")
        if self.loss_agg not in LOSS_AGG_MODES:
            problems.append(f"loss_agg={self.loss_agg!r} must be one of {', '.join(LOSS_AGG_MODES)}")
        if problems:
            raise ValueError("invalid PPO: " + "; ".join(problems))

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, batch: TrainBatch) -> Advantages:
        """Per-token GAE advantages and returns of the batch the critic has valued (`token_advantages`)."""
        advantages, returns, metrics = self.token_advantages(batch)
        return Advantages(advantages, returns, metrics)

    @no_grad
    def token_advantages(self, batch: TrainBatch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Per-token (advantages, returns), `[B, T]` each, and metrics, from `batch.rewards` `[B]`,
        `batch.old_values`, `batch.old_logprobs` and (with kl_coef > 0) `batch.ref_logprobs`.

        r_t = R on the last response token (a multi-turn episode: each turn's reward on its last policy token,
        `batch.turn_rewards`) - kl_coef * (log pi_old - log pi_ref)_t (k1, in the reward, as
        InstructGPT); GAE(gamma, lam) gives A_t and the critic's targets R_t = A_t + V_t; A is then
        whitened over the batch's response tokens (the returns are not).
        """
        mask = batch.response_mask
        kl = None
        if self.kl_coef > 0:
            if batch.ref_logprobs is None or batch.old_logprobs is None:
                raise ValueError("PPO(kl_coef > 0) needs batch.old_logprobs and batch.ref_logprobs filled")
            kl = kl_estimate(batch.old_logprobs.float(), batch.ref_logprobs.float(), "k1")  # [B, T]
        rewards = token_rewards(batch.rewards, mask, kl, self.kl_coef, placed=batch.turn_rewards)  # [B, T]
        advantages, returns = gae_advantages(rewards, batch.old_values, mask, self.gamma, self.lam)
        metrics = {
            "critic/explained_variance": explained_variance(batch.old_values, returns, mask),
            "critic/old_value_mean": masked_mean(batch.old_values, mask),
            "critic/return_mean": masked_mean(returns, mask),
            "advantage/mean": masked_mean(advantages, mask),
            "advantage/abs_mean": masked_mean(advantages.abs(), mask),
        }
        if kl is not None:
            metrics["rollout/kl_k1"] = masked_mean(kl, mask)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in metrics.values()]).tolist()
        return advantages, returns, dict(zip(metrics, values))

    def loss(
        self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float, max_tokens: int
    ) -> tuple[Tensor, dict[str, float]]:
        """The clipped surrogate with per-token advantages `batch.advantages` `[B, T]`."""
        old_logprobs = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        loss, metrics = clipped_policy_loss(
            logprobs, old_logprobs, batch.advantages, batch.response_mask, clip_low=self.clip_low,
            clip_high=self.clip_high, engine_logprobs=batch.engine_logprobs, tis_cap=self.tis_cap,
            loss_agg=self.loss_agg, max_tokens=max_tokens, num_sequences=num_sequences, num_tokens=num_tokens,
        )
        metrics["policy_loss"] = loss.detach()
        if batch.ref_logprobs is not None:  # reported only: the penalty is in the reward
            metrics["kl"] = masked_mean(kl_estimate(logprobs.detach(), batch.ref_logprobs, "k1"),
                                        batch.response_mask, num_tokens)
        return loss, {key: value.detach().float() for key, value in metrics.items()}  # on the device

    def value_loss(
        self, values: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float
    ) -> tuple[Tensor, dict[str, float]]:
        """PPO's clipped value loss of the critic's `values` `[B, T]` against `batch.returns`."""
        if batch.old_values is None or batch.returns is None:
            raise ValueError("the value loss needs batch.old_values and batch.returns (from token_advantages)")
        loss, metrics = clipped_value_loss(values, batch.old_values, batch.returns, batch.response_mask,
                                           self.value_clip, num_tokens=num_tokens)
        metrics["value_loss"] = loss.detach()
        return loss, {key: value.detach().float() for key, value in metrics.items()}  # on the device
