"""Group-relative advantages: each prompt's sampled responses are scored against each other.

Rewards arrive flat, `[N]`, with the group of each row given one of two ways:
- `group_size=G`: rows `i*G .. (i+1)*G - 1` are the G responses to prompt i (the order in which the actor
  returns a `Group`'s completions);
- `group_index=[N]` (long): rows with the same index answer the same prompt, in any order and any number
  per prompt. This is what a policy iteration hands an objective: responses the oracle could not score
  have left their group, so groups may be ragged.
Advantages come back in the same order and shape. Both ways give the same numbers on the same groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from winnow.lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")


@dataclass
class Advantages:
    """What `PolicyObjective.advantages` returns for a batch."""

    values: Tensor
    """per-sequence advantages `[B]`, or per-token `[B, T]` (0 off the response mask)"""
    returns: Tensor | None = None
    """the critic's regression targets `[B, T]` (critic objectives only)"""
    metrics: dict[str, float] = field(default_factory=dict)
    """numbers for the log, e.g. `advantage/mean`"""


def advantage_metrics(advantages: Tensor) -> dict[str, float]:
    """`advantage/mean` and `advantage/abs_mean` of per-sequence advantages `[B]`."""
    return {"advantage/mean": float(advantages.mean()), "advantage/abs_mean": float(advantages.abs().mean())}


STD_EPS = 1e-6
"""added to the group's std before dividing, so a near-flat group does not blow its advantages up"""


def group_advantages(rewards: Tensor, group_size: int | None = None, scale_by_std: bool = True, *,
                     group_index: Tensor | None = None) -> Tensor:
    """Group-relative advantages of GRPO and Dr. GRPO.

        A_i = (r_i - mean(r)) / (std(r) + 1e-6)    if scale_by_std  (GRPO; Shao et al. 2024, DeepSeekMath)
        A_i =  r_i - mean(r)                       otherwise        (Dr. GRPO; Liu et al. 2025,
                                                                     "Understanding R1-Zero-like training")

    mean and std are over the responses to the same prompt. std is the *population* std
    (divide by G, `unbiased=False`), not the sample std (divide by G-1) that DeepSeekMath's and TRL's
    `torch.std` use, because:
      - it is defined for every group size: the sample std of a group of 1 is 0/0 = NaN, which would
        turn every advantage into NaN, while the population std is 0 and gives advantages of 0;
      - it is the std of the very numbers being normalised, so a group's advantages have unit RMS.
    For a fixed G the two differ by the constant factor sqrt((G-1)/G) (0.87 at G=4, 0.97 at G=16),
    i.e. a rescaled learning rate, not a different direction.

    A group whose rewards are all equal gets advantages of exactly 0 (never NaN, never rounding residue).

    Args:
        rewards: `[N]` rewards.
        group_size: G, when the G rewards of each prompt are consecutive; or
        group_index: `[N]` long, the group of each row (ragged groups allowed).
        scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).

    Returns:
        `[N]` advantages, float, in the order of `rewards`.
    """
    centered, inverse, counts = _centered(rewards, group_size, group_index)  # [N], [N], [num_groups]
    if scale_by_std:
        variance = torch.zeros_like(counts).index_add_(0, inverse, centered.pow(2)) / counts  # [num_groups]
        centered = centered / (variance.sqrt()[inverse] + STD_EPS)
    return centered


def rloo_advantages(rewards: Tensor, group_size: int | None = None, *, group_index: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019).

        A_i = r_i - mean_{j != i} r_j  =  G / (G - 1) * (r_i - mean(r))

    The baseline of sample i excludes r_i, so it is independent of sample i and the policy-gradient
    estimate stays unbiased (the plain group mean of GRPO shrinks it by (G-1)/G). No std scaling.

    Args:
        rewards: `[N]` rewards.
        group_size: G >= 2, when the G rewards of each prompt are consecutive; or
        group_index: `[N]` long, the group of each row; every group needs >= 2 rows.

    Returns:
        `[N]` advantages, float, in the order of `rewards`; exactly 0 in groups with equal rewards.
    """
    if group_size is not None and group_size < 2:
        raise ValueError(
            f"group_size={group_size}: RLOO needs >= 2 samples per prompt, since the baseline of each "
            f"sample is the mean reward of the others"
        )
    centered, inverse, counts = _centered(rewards, group_size, group_index)
    if bool((counts < 2).any()):
        raise ValueError("a group has 1 sample: RLOO needs >= 2 samples per prompt, since the baseline of each "
                         "sample is the mean reward of the others")
    return centered * (counts / (counts - 1))[inverse]


def _centered(rewards: Tensor, group_size: int | None, group_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`r - mean(group)` `[N]` (exactly 0 in groups whose rewards are all equal), each row's group number
    `[N]` (0 .. num_groups-1) and the groups' sizes `[num_groups]` (float)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if (group_size is None) == (group_index is None):
        raise ValueError("give exactly one of group_size (consecutive groups) and group_index (a group per row)")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        if rewards.numel() % group_size != 0:
            raise ValueError(
                f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}: "
                f"rewards must be [B*G] with the G samples of each prompt consecutive"
            )
        inverse = torch.arange(rewards.numel(), device=rewards.device) // group_size
    else:
        if group_index.shape != rewards.shape:
            raise ValueError(f"group_index {tuple(group_index.shape)} must have the rewards' shape {tuple(rewards.shape)}")
        inverse = torch.unique(group_index, return_inverse=True)[1]
    num_groups = int(inverse.max()) + 1 if rewards.numel() else 0
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(counts).index_add_(0, inverse, rewards) / counts  # [num_groups]
    centered = rewards - mean[inverse]
    # Why the explicit zero: in floating point mean([x]*G) need not equal x (0.1 * 3 / 3 != 0.1), so a
    # flat group would get a residue of ~1e-8, which dividing by (std + 1e-6) with std == 0 turns into
    # an advantage of ~1e-2 with a random sign. A flat group carries no learning signal; make it 0.
    high = torch.full_like(counts, -torch.inf).scatter_reduce_(0, inverse, rewards, "amax")
    low = torch.full_like(counts, torch.inf).scatter_reduce_(0, inverse, rewards, "amin")
    is_flat = (high == low)[inverse]  # [N]
    return centered.masked_fill(is_flat, 0.0), inverse, counts
