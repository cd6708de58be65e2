"""A test-only example of a new RL objective with a batch-level baseline, in one file: REINFORCE++'s global
advantage normalisation (Hu 2025, "REINFORCE++"), A = (r - mean over the batch) / std over the batch, with
GRPO's clipped surrogate as its loss. Registering it is one line: `OBJECTIVES["reinforce++"] = ReinforcePP`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from winnow.algorithms import GRPO, Advantages
from winnow.algorithms.advantages import STD_EPS, advantage_metrics
from winnow.types import TrainBatch


@dataclass
class ReinforcePP(GRPO):
    """REINFORCE with the batch as the baseline: every scored sample trains, groups of one included."""

    name: ClassVar[str] = "reinforce++"
    uses_group_baseline: ClassVar[bool] = False

    def advantages(self, batch: TrainBatch) -> Advantages:
        centered = batch.rewards - batch.rewards.mean()  # [B]: the whole batch, not the prompt's group
        values = centered / (centered.pow(2).mean().sqrt() + STD_EPS)
        return Advantages(values, metrics=advantage_metrics(values))
