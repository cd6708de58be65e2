"""Preference losses: DPO, IPO, SLiC and SimPO, per pair, and their configured objects.

Notation: for each pair, pi_w / pi_l are the policy's log-probabilities of the chosen and rejected responses,
ref_w / ref_l the reference model's, and Delta = (pi_w - pi_l) - (ref_w - ref_l): how much more the policy
prefers the chosen response than the reference did. Every function takes `[P]` tensors (one entry per pair)
and returns the `[P]` per-pair losses, so a caller can weight, mask or average them as it needs.

The objects (`DPO`, `IPO`, `SLiC`, `SimPO`) say what the functions leave to the caller: whether a sequence's
log-probability is the sum over its tokens or their mean (`uses_length_average`), and whether a reference
model is needed (`needs_reference`). Their `loss` reads a batch whose rows are interleaved pairs,
[chosen_0, rejected_0, chosen_1, rejected_1, ...], and is normalised by the number of pairs in the whole
mini-batch, so the learner's micro-batch losses add up (micro-batches must hold whole pairs: an even
`micro_batch_size`; `Learner.train_policy(..., rows_per_unit=2)` checks it).

Online use (sample two responses from the current policy, label them with an oracle, take a step) is
Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (OAIF).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, TYPE_CHECKING, runtime_checkable

from winnow.lazy import lazy_import
from winnow.types import TrainBatch

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Direct Preference Optimization (Rafailov et al. 2023):
    -(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta).

    eps = `label_smoothing` is the conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences"):
    the label is assumed flipped with probability eps, so the loss no longer pushes Delta to infinity.
    Inputs are summed sequence log-probabilities, [P] each; returns [P].
    """
    logits = beta * _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # logsigmoid, not log(sigmoid(.)): exact for large |logits| where sigmoid rounds to 0 or 1.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences"): (Delta - 1/(2 beta))^2.

    A regression of Delta onto a finite target, so a deterministic preference cannot drive the policy
    infinitely far from the reference (DPO's overfitting failure). Following the paper's experiments (and
    TRL), the caller passes length-averaged log-probabilities; `IPO` does. [P] each; returns [P].
    """
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (delta - 1 / (2 * beta)) ** 2


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback"), in the reference-anchored form of Liu et al. 2024 (RSO) and TRL's "hinge": max(0, 1 - beta Delta).

    The paper's margin delta is 1/beta here and its regulariser is the reference anchoring in Delta (instead
    of an SFT term). Summed log-probabilities, [P] each; returns [P].
    """
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * delta)


def simpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float, gamma_beta_ratio: float
) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
    -log sigma(beta (pi_w - pi_l) - beta gamma_beta_ratio), on length-averaged log-probabilities.

    No reference model: the implicit reward is the average log-probability, the one the policy generates
    by, and the target margin gamma = beta * gamma_beta_ratio asks the chosen to win by a clear gap. [P] each.
    """
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - beta * gamma_beta_ratio)


def _delta(pi_w: Tensor, pi_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> Tensor:
    return (pi_w - pi_l) - (ref_w - ref_l)


# ---------------------------------------------------------------------- configured objects


@runtime_checkable
class PreferenceObjective(Protocol):
    """What the preference trainer needs from a preference loss."""

    name: ClassVar[str]
    """the registry name, e.g. "dpo" (for logs and the CLI)"""

    needs_reference: ClassVar[bool]
    """True when `loss` reads `batch.ref_logprobs` (the trainer runs the reference model once per iteration)"""
    uses_length_average: ClassVar[bool]
    """True when sequence log-probabilities are means over response tokens, False when sums"""

    def pair_losses(self, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None,
                    ref_rejected: Tensor | None) -> Tensor:
        """Per-pair losses [P] from sequence log-probabilities [P] each (reduced as `uses_length_average` says)."""
        ...

    def loss(self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float
             ) -> tuple[Tensor, dict[str, float]]:
        """The loss of one micro-batch of interleaved pairs and its metrics, both summing over micro-batches."""
        ...


class _PairedLoss:
    """The shared `loss`: pair the rows, reduce per sequence, call `pair_losses`, normalise by pairs."""

    beta: float
    needs_reference: ClassVar[bool]
    uses_length_average: ClassVar[bool]

    def loss(self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float
             ) -> tuple[Tensor, dict[str, float]]:
        """logprobs: [B, T] per-token log pi_theta with grad, rows [chosen_0, rejected_0, ...]; B even.
        num_sequences: rows in the whole mini-batch, so num_sequences / 2 pairs normalise the sum."""
        if batch.batch_size % 2:
            raise ValueError(f"a preference micro-batch has {batch.batch_size} rows; rows come in (chosen, "
                             f"rejected) pairs, so use an even learner.micro_batch_size")
        num_pairs = num_sequences / 2
        policy = _sequence_logps(logprobs, batch.response_mask, self.uses_length_average)  # [B]
        chosen, rejected = policy[0::2], policy[1::2]  # [P] each
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            if batch.ref_logprobs is None:
                raise ValueError(f"{type(self).__name__} needs batch.ref_logprobs: compute them with "
                                 f"Learner.reference_logprobs(batch) before training")
            ref = _sequence_logps(batch.ref_logprobs, batch.response_mask, self.uses_length_average)
            ref_chosen, ref_rejected = ref[0::2], ref[1::2]
        losses = self.pair_losses(chosen, rejected, ref_chosen, ref_rejected)  # [P]
        with torch.no_grad():
            margin = chosen - rejected  # [P]
            if ref_chosen is not None:
                margin = margin - (ref_chosen - ref_rejected)
            # The implicit reward margin beta * Delta (DPO's "rewards/margins"); SimPO's has no reference.
            metrics = {
                "pref/reward_margin": (self.beta * margin).sum() / num_pairs,
                "pref/reward_accuracy": (margin > 0).float().sum() / num_pairs,
                "pref/chosen_logps": chosen.sum() / num_pairs,
                "pref/rejected_logps": rejected.sum() / num_pairs,
            }
        loss = losses.sum() / num_pairs
        return loss, {key: value.float() for key, value in metrics.items()}  # on the device


def _sequence_logps(logprobs: Tensor, mask: Tensor, length_average: bool) -> Tensor:
    """Per-sequence log-probability [B] from per-token [B, T]: the masked sum, or its mean over the response."""
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_average else total


@dataclass
class DPO(_PairedLoss):
    """Direct Preference Optimization (Rafailov et al. 2023), online as in Guo et al. 2024; summed logprobs."""

    name: ClassVar[str] = "dpo"

    beta: float = 0.1
    """strength of the KL anchor to the reference: larger keeps the policy closer to it"""
    label_smoothing: float = 0.0
    """probability that a preference label is flipped (conservative DPO); 0 is plain DPO"""

    def __post_init__(self) -> None:
        _check_beta(self)
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"invalid DPO: label_smoothing={self.label_smoothing} must be in [0, 0.5)")

    needs_reference: ClassVar[bool] = True
    uses_length_average: ClassVar[bool] = False

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)


@dataclass
class IPO(_PairedLoss):
    """Identity Preference Optimisation (Azar et al. 2023): squared loss towards a margin of 1/(2 beta);
    length-averaged logprobs."""

    name: ClassVar[str] = "ipo"

    beta: float = 0.1
    """regularisation: the target Delta is 1/(2 beta), so a smaller beta allows a larger margin"""

    def __post_init__(self) -> None:
        _check_beta(self)

    needs_reference: ClassVar[bool] = True
    uses_length_average: ClassVar[bool] = True

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)


@dataclass
class SLiC(_PairedLoss):
    """SLiC-HF's hinge calibration loss (Zhao et al. 2023), reference-anchored; summed logprobs."""

    name: ClassVar[str] = "slic"

    beta: float = 0.1
    """inverse margin: the hinge is max(0, 1 - beta Delta), so the loss stops at Delta = 1/beta"""

    def __post_init__(self) -> None:
        _check_beta(self)

    needs_reference: ClassVar[bool] = True
    uses_length_average: ClassVar[bool] = False

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return slic_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)


@dataclass
class SimPO(_PairedLoss):
    """SimPO (Meng et al. 2024): reference-free, length-averaged logprobs, target margin gamma."""

    name: ClassVar[str] = "simpo"

    beta: float = 2.0
    """reward scale on the average log-probability (the paper uses 2.0-2.5)"""
    gamma_beta_ratio: float = 0.5
    """target margin gamma divided by beta (the paper's gamma/beta, 0.3-0.8)"""

    def __post_init__(self) -> None:
        _check_beta(self)

    needs_reference: ClassVar[bool] = False
    uses_length_average: ClassVar[bool] = True

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return simpo_loss(chosen, rejected, self.beta, self.gamma_beta_ratio)


def xpo_exploration_term(policy_logps: Tensor, sampled_by_reference: Tensor, alpha: float) -> Tensor:
    """XPO's exploration term (Xie et al. 2024, "Exploratory Preference Optimization", Algorithm 1):
    alpha * log pi_theta(y_ref | x) for each row the reference policy sampled, 0 for the others; [B] -> [B].

    Added to the *minimised* loss, so its gradient lowers the policy's probability of what the reference
    samples: the policy is pushed to explore away from the reference's responses. It is not a KL bonus."""
    return alpha * policy_logps * sampled_by_reference


@dataclass
class XPO(DPO):
    """XPO (Xie et al. 2024): DPO on pairs of (policy sample, reference sample) + alpha * log pi(y_ref | x).
    Pairs come from `--pairs.selection xpo`; summed logprobs."""

    name: ClassVar[str] = "xpo"
    pair_selection: ClassVar[str] = "xpo"
    """the pairs it needs: `winnow train xpo` selects them unless told otherwise"""

    alpha: float = 5e-6
    """weight of the exploration term alpha * sum_t log pi(y_ref | x), added to the minimised loss (the seed
    framework's 5e-6; TRL's XPOTrainer used 1e-5)"""

    def loss(self, logprobs: Tensor, batch: TrainBatch, *, num_sequences: int, num_tokens: float
             ) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = super().loss(logprobs, batch, num_sequences=num_sequences, num_tokens=num_tokens)
        if batch.sampled_by_reference is None:
            raise ValueError("xpo needs pairs with a reference sample: use --pairs.selection xpo")
        policy = _sequence_logps(logprobs, batch.response_mask, False)  # [B]
        term = xpo_exploration_term(policy, batch.sampled_by_reference.to(policy.dtype), self.alpha).sum()
        num_pairs = num_sequences / 2
        metrics["pref/xpo_reference_logps"] = (policy.detach() * batch.sampled_by_reference).sum() / num_pairs
        return loss + term / num_pairs, metrics


PREFERENCE_OBJECTIVES: dict[str, type] = {"dpo": DPO, "ipo": IPO, "slic": SLiC, "simpo": SimPO, "xpo": XPO}
"""preference objectives by name, as the CLI spells them (`winnow train dpo`)"""


def _check_beta(objective) -> None:
    if not objective.beta > 0:
        raise ValueError(f"invalid {type(objective).__name__}: beta={objective.beta} must be > 0")
