"""Per-token advantages from a learned critic: PPO's reward shaping, GAE, whitening and value loss.

Classic RLHF PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al.
2022, InstructGPT) treats each response token as an action. Tensors here are `[B, T]`, aligned like
`TrainBatch.response_mask`: position t holds the value for *emitting* token t (the state is the prefix
before it), so a critic's value at t is read from the hidden state at t - 1, as logprobs are.

Masks are 1 on the response tokens. A position where the mask is 0 is not an action: GAE passes over it
(right padding after the response, the prompt before it, or a hole such as a tool's output), and after
the last response token the episode ends, so nothing is bootstrapped past it (V = 0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from winnow.lazy import lazy_import, no_grad
from winnow.algorithms.aggregation import aggregate_loss, masked_mean

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

WHITEN_EPS = 1e-8
"""added to the variance before the square root in `whiten`, so a constant input does not divide by 0"""


def token_rewards(
    rewards: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0, placed: Tensor | None = None
) -> Tensor:
    """Spread sequence rewards over tokens, as in classic RLHF PPO (Ziegler et al. 2019).

        r_t = -kl_coef * kl_t + [t is the last response token] * R

    The sequence reward R (the oracle's score) lands on the last response token. `kl` is a per-token
    estimate of KL(pi_old || pi_ref) on the sampled tokens, in RLHF PPO the k1 estimator
    log pi_old - log pi_ref: a penalty *in the reward* (not a loss term), so the critic learns it too and
    GAE carries it back to earlier tokens. A row with an empty mask gets no reward (it has no action).

    Args:
        rewards: `[B]` sequence rewards.
        mask: `[B, T]` 1 on response tokens.
        kl: `[B, T]` per-token KL estimate, or None (no penalty).
        kl_coef: weight beta of the penalty.
        placed: `[B, T]` rewards already on their tokens (a multi-turn episode's turn rewards, each on its
            turn's last policy token), used instead of R on the last token; None: R on the last token.

    Returns:
        `[B, T]` float rewards, 0 off the mask.
    """
    if mask.dim() != 2 or rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be [B] and mask {tuple(mask.shape)} [B, T]")
    is_token = mask != 0  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = torch.where(is_token, positions, -1).max(dim=1).values  # [B], -1 for an empty row
    is_last = (positions == last.unsqueeze(1)) & is_token  # [B, T]
    out = torch.where(is_last, rewards.float().unsqueeze(1), 0.0)  # [B, T]
    if placed is not None:
        out = torch.where(is_token, placed.float(), 0.0)  # [B, T]
    if kl is not None and kl_coef != 0:
        if kl.shape != mask.shape:
            raise ValueError(f"kl {tuple(kl.shape)} must be [B, T] like mask {tuple(mask.shape)}")
        out = out - kl_coef * torch.where(is_token, kl.float(), 0.0)
    return out


@no_grad
def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation"), over the response tokens of each row.

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        R_t     = A_t + V_t                           (the critic's regression target, "returns")

    next(t) is the next position whose mask is 1; past the last response token V_next = A_next = 0 (the
    episode ends: no bootstrap). Positions with mask 0 are skipped, not treated as steps, so right padding,
    the prompt and holes in the mask change nothing; they get A = R = 0.

    gamma = 1 is the usual choice for language (the episode is short and the reward comes at its end);
    lam < 1 trades the critic's bias for less variance. With lam = 1 and gamma = 1, A_t = sum of rewards
    from t on, minus V_t (Monte Carlo with a baseline).

    Args:
        token_rewards: `[B, T]` per-token rewards (see `token_rewards`).
        values: `[B, T]` V_t from the critic when the samples were drawn (no grad).
        mask: `[B, T]` 1 on response tokens.
        gamma: discount per token.
        lam: GAE's lambda.

    Returns:
        (advantages, returns), both `[B, T]` float32 and 0 off the mask.
    """
    if not token_rewards.shape == values.shape == mask.shape or mask.dim() != 2:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    is_token = mask != 0  # [B, T]
    rewards, values = token_rewards.float(), values.float()
    advantages = torch.zeros_like(values)  # [B, T]
    next_value = torch.zeros_like(values[:, 0])  # [B], V of the next action; 0 after the last one
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    # A Python loop over T columns, vectorised over B: T is the response length (tens to thousands of
    # tokens), each step a few [B] ops.
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(is_token[:, t], advantage, 0.0)
        next_value = torch.where(is_token[:, t], values[:, t], next_value)
        next_advantage = torch.where(is_token[:, t], advantage, next_advantage)
    returns = torch.where(is_token, advantages + values, 0.0)
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the whole batch; 0 off the mask.

    mean and var are over every masked token of every row (token-level, as PPO implementations whiten
    per-token advantages), var the *population* variance (divide by N) like `group_advantages`' std.
    With shift_mean=False the mean is added back: only the scale changes (useful for rewards, whose sign
    carries meaning).

    Args:
        x: `[B, T]`.
        mask: `[B, T]` 1 on the entries that count.
        shift_mean: centre the result (True) or keep x's mean (False).

    Returns:
        `[B, T]` float, 0 off the mask.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")
    is_token = mask != 0
    x = x.float()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).pow(2), mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(is_token, out, 0.0)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    *,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (Schulman et al. 2017; the form of OpenAI baselines' ppo2), token-mean.

        V_clip = old_V + clip(V - old_V, -clip, clip)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)
        loss   = sum_t l_t * m_t / num_tokens

    The max makes the clipped term a pessimistic bound: a step that moves V more than `clip` away from
    old_V gets no further gradient when moving it was what reduced the error. clip=None is the plain
    0.5 * (V - R)^2. Note the clip is in the reward's units (unlike the policy's ratio clip): with
    rewards in [0, 1], 0.2 is a fifth of the range.

    Args:
        values: `[B, T]` V_theta, with grad.
        old_values: `[B, T]` the critic's values when the samples were drawn (no grad).
        returns: `[B, T]` targets R_t (from `gae_advantages`).
        mask: `[B, T]` 1 on response tokens.
        clip: the clip range, or None for no clipping.
        num_tokens: the mini-batch's masked tokens (see `aggregate_loss`); micro-batch losses then sum.

    Returns:
        (loss, metrics), the loss a 0-dim tensor. The metrics are detached token means (divided by
        num_tokens when given, so they too sum over micro-batches):
          value_clip_fraction  tokens where the clipped term is strictly the larger (their gradient is 0)
          value_mean           mean of V
          value_error          mean of |V - R|
    """
    if not values.shape == old_values.shape == returns.shape == mask.shape or values.dim() != 2:
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must all be [B, T]"
        )
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    unclipped = (values - returns).pow(2)  # [B, T]
    if clip is None:
        per_token, is_clipped = 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        # Clamp V itself, not `old + clamp(V - old)`: in float32 `old + (V - old)` is often not V, which made
        # tokens inside the range count as clipped (V=0.017999952659, old=0.2, c=0.2 counted 1, is 0).
        clipped_values = values.clamp(min=old_values - clip, max=old_values + clip)
        clipped = (clipped_values - returns).pow(2)  # [B, T]
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
    loss = aggregate_loss(per_token, mask, "token-mean", num_tokens=num_tokens)
    with torch.no_grad():
        metrics = {
            "value_clip_fraction": masked_mean(is_clipped.float(), mask, num_tokens),
            "value_mean": masked_mean(values, mask, num_tokens),
            "value_error": masked_mean((values - returns).abs(), mask, num_tokens),
        }
    return loss, metrics


@no_grad
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant,
    < 0 worse than one. NaN when the returns are constant (nothing to explain). A 0-dim tensor."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)).pow(2), mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)).pow(2), mask)
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1.0 - var_residual / var_returns
