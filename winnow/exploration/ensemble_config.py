"""The settings of SEA's epistemic reward model (`winnow.exploration.ensemble`), apart from the model itself so that
the config imports without torch (`winnow COMMAND --help` builds it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EnsembleConfig:
    """The epistemic reward model of SEA (defaults: the seed framework's)."""

    num_members: int = 20
    """ensemble members E"""
    hidden_size: int = 128
    """width of each member's two hidden layers"""
    lr: float = 1e-3
    """Adam learning rate"""
    weight_decay: float = 5e-5
    """Adam weight decay"""
    reg_lambda: float = 0.5
    """lambda: weight of the pull towards each member's initial parameters"""
    fixed_reg: bool = False
    """use lambda * mean((theta - theta0)^2) (the factor B / N_q fixed at 1) instead of shrinking it with queries"""
    batch_size: int = 128
    """labelled pairs per training step (B); training waits until the buffer holds B pairs"""
    steps_per_iteration: int = 5
    """optimizer steps on the ensemble per policy iteration"""
    buffer_size: int = 50_000
    """replay buffer: the last this many labelled pairs, sampled uniformly"""
