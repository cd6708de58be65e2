"""Group-relative advantages: each prompt's G sampled responses are scored against each other.

Rewards arrive flat, `[B*G]`, grouped consecutively: rows `i*G .. (i+1)*G - 1` are the G responses to
prompt i (the order in which the actor returns a `Group`'s completions). Advantages come back in the
same order and shape.
"""
from __future__ import annotations

from torch import Tensor

STD_EPS = 1e-6
"""added to the group's std before dividing, so a near-flat group does not blow its advantages up"""


def _centered_groups(rewards: Tensor, group_size: int) -> Tensor:
    """`r - mean(group)` as a `[B, G]` tensor, exactly 0 in groups whose rewards are all equal."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}: "
            f"rewards must be [B*G] with the G samples of each prompt consecutive"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    # Why the explicit zero: in floating point mean([x]*G) need not equal x (0.1 * 3 / 3 != 0.1), so a
    # flat group would get a residue of ~1e-8, which dividing by (std + 1e-6) with std == 0 turns into
    # an advantage of ~1e-2 with a random sign. A flat group carries no learning signal; make it 0.
    is_flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    return centered.masked_fill(is_flat, 0.0)


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool) -> Tensor:
    """Group-relative advantages of GRPO and Dr. GRPO.

        A_i = (r_i - mean(r)) / (std(r) + 1e-6)    if scale_by_std  (GRPO; Shao et al. 2024, DeepSeekMath)
        A_i =  r_i - mean(r)                       otherwise        (Dr. GRPO; Liu et al. 2025,
                                                                     "Understanding R1-Zero-like training")

    mean and std are over the G responses to the same prompt. std is the *population* std
    (divide by G, `unbiased=False`), not the sample std (divide by G-1) that DeepSeekMath's and TRL's
    `torch.std` use, because:
      - it is defined for every group size: the sample std of a group of 1 is 0/0 = NaN, which would
        turn every advantage into NaN, while the population std is 0 and gives advantages of 0;
      - it is the std of the very numbers being normalised, so a group's advantages have unit RMS.
    For a fixed G the two differ by the constant factor sqrt((G-1)/G) (0.87 at G=4, 0.97 at G=16),
    i.e. a rescaled learning rate, not a different direction.

    A group whose rewards are all equal gets advantages of exactly 0 (never NaN, never rounding residue).

    Args:
        rewards: `[B*G]`, the G rewards of each prompt consecutive.
        group_size: G, responses per prompt (>= 1).
        scale_by_std: divide by the group's std (GRPO) or not (Dr. GRPO).

    Returns:
        `[B*G]` advantages, float, in the order of `rewards`.
    """
    centered = _centered_groups(rewards, group_size)  # [B, G]
    if scale_by_std:
        std = centered.pow(2).mean(dim=1, keepdim=True).sqrt()  # [B, 1], population std
        centered = centered / (std + STD_EPS)
    return centered.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019).

        A_i = r_i - mean_{j != i} r_j  =  G / (G - 1) * (r_i - mean(r))

    The baseline of sample i excludes r_i, so it is independent of sample i and the policy-gradient
    estimate stays unbiased (the plain group mean of GRPO shrinks it by (G-1)/G). No std scaling.

    Args:
        rewards: `[B*G]`, the G rewards of each prompt consecutive.
        group_size: G >= 2 (with one sample there is nothing to leave one out of).

    Returns:
        `[B*G]` advantages, float, in the order of `rewards`; exactly 0 in groups with equal rewards.
    """
    if group_size < 2:
        raise ValueError(
            f"group_size={group_size}: RLOO needs >= 2 samples per prompt, since the baseline of each "
            f"sample is the mean reward of the others"
        )
    centered = _centered_groups(rewards, group_size)  # [B, G]
    return (centered * (group_size / (group_size - 1))).reshape(-1)
