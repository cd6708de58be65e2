"""Algorithms: pure tensor math and small configured objects, no orchestration.

- advantages: `group_advantages` (GRPO, Dr. GRPO), `rloo_advantages`, the `Advantages` record objectives return
- kl: `kl_estimate` (Schulman's k1, k2, k3)
- aggregation: `aggregate_loss` (token-mean, seq-mean-token-mean, seq-mean-token-sum-norm)
- policy_loss: `clipped_policy_loss` (clipped surrogate, clip-higher, truncated importance sampling)
- gae: `token_rewards`, `gae_advantages`, `whiten`, `clipped_value_loss`, `explained_variance` (PPO's critic side)
- objectives: `PolicyObjective` and its configured implementations `GRPO`, `DrGRPO`, `RLOO`, `PPO` (ppo.py), by
  name in `OBJECTIVES`
- sft: `sft_loss` (completion-token NLL)
- preference: `dpo_loss`, `ipo_loss`, `slic_loss`, `simpo_loss` per pair, and `DPO`, `IPO`, `SLiC`, `SimPO` by
  name in `PREFERENCE_OBJECTIVES`
"""
from winnow.algorithms.advantages import Advantages, group_advantages, rloo_advantages
from winnow.algorithms.aggregation import LOSS_AGG_MODES, LossAggregation, aggregate_loss, masked_mean
from winnow.algorithms.kl import KL_ESTIMATORS, KLEstimator, kl_estimate
from winnow.algorithms.objectives import GRPO, OBJECTIVES, RLOO, DrGRPO, PolicyObjective
from winnow.algorithms.policy_loss import clipped_policy_loss
from winnow.algorithms.gae import clipped_value_loss, explained_variance, gae_advantages, token_rewards, whiten
from winnow.algorithms.ppo import PPO
from winnow.algorithms.sft import sft_loss

__all__ = [
    "Advantages",
    "GRPO",
    "KLEstimator",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LossAggregation",
    "OBJECTIVES",
    "PPO",
    "RLOO",
    "DrGRPO",
    "PolicyObjective",
    "aggregate_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "explained_variance",
    "gae_advantages",
    "group_advantages",
    "kl_estimate",
    "masked_mean",
    "rloo_advantages",
    "sft_loss",
    "token_rewards",
    "whiten",
]
from winnow.algorithms.preference import (  # noqa: E402  (preference losses: DPO, IPO, SLiC, SimPO)
    DPO,
    IPO,
    PREFERENCE_OBJECTIVES,
    PreferenceObjective,
    SimPO,
    SLiC,
    XPO,
    dpo_loss,
    ipo_loss,
    simpo_loss,
    slic_loss,
    xpo_exploration_term,
)

__all__ += ["DPO", "IPO", "PREFERENCE_OBJECTIVES", "PreferenceObjective", "SLiC", "SimPO", "dpo_loss", "ipo_loss",
            "simpo_loss", "slic_loss", "XPO", "xpo_exploration_term"]
