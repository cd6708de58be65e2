"""Policy objectives: configured objects that turn a batch's rewards into advantages and logprobs into a loss.

The loop holds one `PolicyObjective` chosen from `OBJECTIVES` by name and calls the same members whatever
the algorithm; variants are fields or small subclasses here, never branches in the loop or the learner.

    objective = OBJECTIVES["grpo"](clip_high=0.28)
    # the loop fills batch.rewards [B] and batch.group_index [B] (rows of one prompt share an index), and,
    # for an objective with needs_critic, batch.old_logprobs, batch.old_values (and batch.ref_logprobs)
    result = objective.advantages(batch)          # Advantages: [B] (or [B, T]) advantages, returns, metrics
    if objective.needs_reference: ...the learner fills batch.ref_logprobs...
    loss, metrics = objective.loss(logprobs, micro_batch, num_sequences=..., num_tokens=..., max_tokens=...)

`advantages` sees the WHOLE batch of the iteration, so a baseline may be per group (GRPO, RLOO), per batch
(REINFORCE++-style whitening) or learned (PPO's critic). An objective declares what it needs instead of
being probed: `uses_group_baseline` (groups with fewer than 2 scored samples carry no signal and are dropped;
`--rollout.drop-uniform-groups` applies), `needs_critic` (the loop trains a value model beside the policy and
calls `value_loss`), `needs_reference` (a frozen reference policy's logprobs).

A new objective is one file with a dataclass like the ones below and one line in `OBJECTIVES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, TYPE_CHECKING, runtime_checkable

from winnow.lazy import lazy_import
from winnow.algorithms.advantages import Advantages, advantage_metrics, group_advantages
from winnow.algorithms.aggregation import LOSS_AGG_MODES, LossAggregation, aggregate_loss
from winnow.algorithms.kl import KL_ESTIMATORS, KLEstimator, kl_estimate
from winnow.algorithms.policy_loss import clipped_policy_loss
from winnow.algorithms.ppo import PPO
from winnow.types import TrainBatch

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")


@runtime_checkable
class PolicyObjective(Protocol):
    """What the loop and the learner need from a policy-gradient algorithm."""

    name: ClassVar[str]
    """the registry name, e.g. "grpo" (for logs and the CLI); a class attribute, not a config field"""
    uses_group_baseline: ClassVar[bool]
    """True when advantages compare a prompt's samples with each other: groups of fewer than 2 scored samples
    are dropped before `advantages`, and `--rollout.drop-uniform-groups` may drop flat ones"""
    needs_critic: ClassVar[bool]
    """True when the loop must train a value model beside the policy: it fills `batch.old_values` (and
    `old_logprobs`) before `advantages`, and steps the critic on `value_loss` after each policy step"""

    @property
    def needs_reference(self) -> bool:
        """True when `advantages` or `loss` reads `batch.ref_logprobs`, so the learner runs the reference."""
        ...

    def advantages(self, batch: TrainBatch) -> Advantages:
        """Advantages of the whole batch from `batch.rewards` `[B]` and `batch.group_index` `[B]`."""
        ...

    def loss(
        self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float, max_tokens: int
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of one micro-batch and its metrics; both SUM over micro-batches to the mini-batch's.

        logprobs: `[B, T]` log pi_theta of `batch.input_ids`, aligned like `batch.response_mask`, with grad.
        num_sequences / num_tokens: sequences / response tokens in the whole mini-batch (see `aggregate_loss`).
        max_tokens: the generation budget, `SamplingParams.max_tokens` (the Dr. GRPO normaliser).
        """
        ...


@dataclass
class GRPO:
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with DAPO's clip-higher as an
    option (Yu et al. 2025), truncated importance sampling against the engine (Yao et al. 2025) and an
    optional KL penalty to a reference model in the loss."""

    name: ClassVar[str] = "grpo"
    uses_group_baseline: ClassVar[bool] = True
    needs_critic: ClassVar[bool] = False

    clip_low: float = 0.2
    """epsilon_low: the ratio pi/pi_old is clipped below at 1 - clip_low"""
    clip_high: float = 0.2
    """epsilon_high: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28)"""
    tis_cap: float | None = 2.0
    """cap on the truncated importance weight pi_old/pi_engine per token; None turns the correction off"""
    kl_coef: float = 0.0
    """weight of the KL(pi || pi_ref) penalty in the loss; 0 turns it off and needs no reference model"""
    kl_estimator: KLEstimator = "k3"
    """per-token KL estimator: k1, k2 or k3 (Schulman 2020); k3 is DeepSeekMath's"""
    loss_agg: LossAggregation = "seq-mean-token-mean"
    """how token losses become one number: token-mean, seq-mean-token-mean or seq-mean-token-sum-norm"""
    scale_by_std: bool = True
    """divide the group-centred rewards by the group's std (GRPO) or not (Dr. GRPO)"""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, batch: TrainBatch) -> Advantages:
        values = group_advantages(batch.rewards, scale_by_std=self.scale_by_std, group_index=batch.group_index)
        return Advantages(values, metrics=advantage_metrics(values))

    def loss(
        self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float, max_tokens: int
    ) -> tuple[Tensor, dict[str, float]]:
        return _surrogate_loss(
            self, logprobs, batch, num_sequences=num_sequences, num_tokens=num_tokens, max_tokens=max_tokens
        )


@dataclass
class DrGRPO(GRPO):
    """Dr. GRPO, "GRPO done right" (Liu et al. 2025, "Understanding R1-Zero-like training"): GRPO without
    its two biases. No std scaling (which up-weights prompts that are nearly always or never solved),
    and each sequence's token losses are summed and divided by the constant generation budget
    `max_tokens`, not by the sequence's own length (which favours long wrong answers)."""

    name: ClassVar[str] = "dr-grpo"

    loss_agg: LossAggregation = "seq-mean-token-sum-norm"
    """how token losses become one number; Dr. GRPO's constant normaliser is the learner's `max_tokens`"""
    scale_by_std: bool = False
    """divide the group-centred rewards by the group's std; Dr. GRPO does not"""


@dataclass
class RLOO(GRPO):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"): each sample's baseline is the mean
    reward of the other samples of its prompt, A_i = G/(G-1) (r_i - mean(r)). Optimised with GRPO's clipped
    surrogate and TIS, so that several optimizer steps per policy iteration stay safe (with one step,
    rho = 1 and the surrogate's gradient is exactly REINFORCE's)."""

    name: ClassVar[str] = "rloo"

    loss_agg: LossAggregation = "token-mean"
    """how token losses become one number: token-mean, seq-mean-token-mean or seq-mean-token-sum-norm"""
    scale_by_std: bool = False
    """also divide by the group's std (off in the paper)"""

    def advantages(self, batch: TrainBatch) -> Advantages:
        # G/(G-1) times GRPO's (or Dr. GRPO's) group-centred advantage is the leave-one-out one.
        _, inverse, counts = torch.unique(batch.group_index, return_inverse=True, return_counts=True)
        if bool((counts < 2).any()):
            raise ValueError("a group has 1 sample: RLOO needs >= 2 samples per prompt (--rollout.num-samples)")
        counts = counts.to(batch.rewards.dtype)
        values = super().advantages(batch).values * (counts / (counts - 1))[inverse]
        return Advantages(values, metrics=advantage_metrics(values))


OBJECTIVES: dict[str, type[PolicyObjective]] = {"grpo": GRPO, "dr-grpo": DrGRPO, "rloo": RLOO, "ppo": PPO}
"""policy objectives by name, as the CLI spells them (`winnow train grpo`)"""


def _validate(objective: GRPO) -> None:
    problems = []
    if objective.clip_low < 0:
        problems.append(f"clip_low={objective.clip_low} must be >= 0")
    if objective.clip_high < 0:
        problems.append(f"clip_high={objective.clip_high} must be >= 0")
    if objective.tis_cap is not None and not objective.tis_cap > 0:
        problems.append(f"tis_cap={objective.tis_cap} must be > 0, or None to turn TIS off")
    if not objective.kl_coef >= 0:
        problems.append(f"kl_coef={objective.kl_coef} must be >= 0")
    if objective.kl_estimator not in KL_ESTIMATORS:
        problems.append(f"kl_estimator={objective.kl_estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
    if objective.loss_agg not in LOSS_AGG_MODES:
        problems.append(f"loss_agg={objective.loss_agg!r} must be one of {', '.join(LOSS_AGG_MODES)}")
    if problems:
        raise ValueError(f"invalid {type(objective).__name__}: " + "; ".join(problems))


def _surrogate_loss(
    objective: GRPO,
    logprobs: Tensor,
    batch: TrainBatch,
    *,
    num_sequences: int,
    num_tokens: float,
    max_tokens: int,
) -> tuple[Tensor, dict[str, float]]:
    """clipped_policy_loss + kl_coef * aggregate(kl_estimate), with the objective's settings."""
    # No old_logprobs means one optimizer step per iteration: pi_old is the current policy, rho = 1 with
    # the gradient of the policy-gradient loss (the learner may skip the extra forward pass).
    old_logprobs = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
    denominators = dict(max_tokens=max_tokens, num_sequences=num_sequences, num_tokens=num_tokens)
    policy_loss, metrics = clipped_policy_loss(
        logprobs,
        old_logprobs,
        batch.advantages,
        batch.response_mask,
        clip_low=objective.clip_low,
        clip_high=objective.clip_high,
        engine_logprobs=batch.engine_logprobs,
        tis_cap=objective.tis_cap,
        loss_agg=objective.loss_agg,
        **denominators,
    )
    loss = policy_loss
    if objective.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError(
            f"{type(objective).__name__}(kl_coef={objective.kl_coef}) needs batch.ref_logprobs: the learner must "
            f"fill them from the reference model when objective.needs_reference is True"
        )
    if batch.ref_logprobs is not None:
        # With kl_coef = 0 the KL is still reported when the reference logprobs happen to be there.
        with torch.set_grad_enabled(objective.kl_coef > 0 and torch.is_grad_enabled()):
            # float32 like the ratios in clipped_policy_loss: bf16 rounding is the size of a typical KL
            per_token_kl = kl_estimate(logprobs.float(), batch.ref_logprobs.float(), objective.kl_estimator)  # [B, T]
            kl = aggregate_loss(per_token_kl, batch.response_mask, objective.loss_agg, **denominators)
        if objective.kl_coef > 0:
            loss = loss + objective.kl_coef * kl
        metrics["kl"] = kl.detach()
    metrics["policy_loss"] = policy_loss.detach()
    # 0-d tensors, left on the device: the learner copies a step's metrics to the host once
    return loss, {key: value.detach().float() for key, value in metrics.items()}
