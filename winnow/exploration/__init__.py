"""Exploration: which of the actor's responses to ask the oracle about (`select`), and what to learn from its
answers (`observe`). See `winnow.exploration.base` for the protocol; selectors by name in `SELECTORS`."""
from __future__ import annotations

import inspect
from typing import Any

from winnow.exploration.apl import APL, APLCertainty, APLConfig
from winnow.exploration.base import Candidate, Judge, PairSelector, to_pairs
from winnow.exploration.best_vs_worst import BestVsWorst
from winnow.exploration.random_pairs import RandomPairs
from winnow.exploration.sea import (
    SEABestArm,
    SEAConfig,
    SEAExploreExploit,
    SEAGreedy,
    SEAPassive,
    SEASelector,
    SEAUncertainty,
)
from winnow.exploration.xpo import XPOPairs

SELECTORS: dict[str, type[PairSelector]] = {
    "random": RandomPairs, "best_vs_worst": BestVsWorst,
    "sea-ee": SEAExploreExploit, "sea-bai": SEABestArm, "sea-uncertainty": SEAUncertainty,
    "sea-passive": SEAPassive, "sea-greedy": SEAGreedy,
    "apl": APL, "apl-certainty": APLCertainty, "xpo": XPOPairs,
}
"""pair selectors by name, as `--pairs.selection` spells them"""


def make_selector(name: str, seed: int = 0, **context: Any) -> PairSelector:
    """The selector `name` names, seeded. `context` offers what some selectors need (their config, SEA's
    `featurize`, APL's `reference_logprobs`, XPO's `reference_generate`); each takes the keywords its
    constructor names and ignores the rest."""
    if name not in SELECTORS:
        raise ValueError(f"--pairs.selection {name!r}: choose one of {', '.join(SELECTORS)}")
    cls = SELECTORS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(seed=seed, **{k: v for k, v in context.items() if k in accepted})


__all__ = ["APL", "APLCertainty", "APLConfig", "BestVsWorst", "Candidate", "Judge", "PairSelector", "RandomPairs",
           "SEABestArm", "SEAConfig", "SEAExploreExploit", "SEAGreedy", "SEAPassive", "SEASelector",
           "SEAUncertainty", "SELECTORS", "XPOPairs", "make_selector", "to_pairs"]
