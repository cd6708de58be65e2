"""Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi.

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html. With
r = pi_ref(x) / pi(x), i.e. log r = ref_logp - logp:

    k1 = -log r                   unbiased, high variance, negative on some tokens
    k2 = 0.5 (log r)^2            biased, low variance, >= 0
    k3 = (r - 1) - log r          unbiased, low variance, >= 0   (GRPO's choice, DeepSeekMath eq. 4)

What each one does *as a loss term* (differentiated w.r.t. logp; Tang & Munos 2025, "On a few pitfalls
in KL divergence gradient estimation for RL"): on-policy, E[grad k2] is the gradient of KL(pi || pi_ref);
E[grad k3] is the gradient of the *forward* KL(pi_ref || pi); E[grad k1] = 0, so k1 only adds noise to
the gradient and is meant for reporting the KL or for putting it in the reward.
"""
from __future__ import annotations

from typing import Literal, TYPE_CHECKING, get_args

from winnow.lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
"""the estimator names `kl_estimate` accepts"""

K3_LOG_RATIO_CLAMP = 20.0
"""k3 clamps log r to [-20, 20] before exp: float32 exp overflows to inf past ~88, and a single such token
(a padding slot, a token the reference finds near-impossible) would make the loss inf or NaN. Inside the
clamp the value is exact; outside it k3 saturates (e^20 ~ 4.9e8) and its gradient is 0 there."""


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLEstimator | str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref), for tokens sampled from pi.

        k1 = logp - ref_logp
        k2 = 0.5 * (logp - ref_logp)^2
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1,  with ref_logp - logp clamped to [-20, 20]

    Args:
        logp: log pi of each sampled token, any shape (e.g. `[B, T]`).
        ref_logp: log pi_ref of the same tokens, same shape.
        kind: "k1", "k2" or "k3" (Schulman 2020); see the module docstring for which to use in a loss.

    Returns:
        The per-token estimate, shape of `logp`; not masked or reduced (see `aggregate_loss`).
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).pow(2)
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator kind={kind!r}; valid kinds: {', '.join(KL_ESTIMATORS)}")
