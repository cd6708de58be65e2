"""Exploration: which of the actor's responses to ask the oracle about (`select`), and what to learn from its
answers (`observe`). See `winnow.exploration.base` for the protocol; selectors by name in `SELECTORS`."""
from __future__ import annotations

from winnow.exploration.base import Candidate, Judge, PairSelector, to_pairs
from winnow.exploration.best_vs_worst import BestVsWorst
from winnow.exploration.random_pairs import RandomPairs

SELECTORS: dict[str, type[PairSelector]] = {"random": RandomPairs, "best_vs_worst": BestVsWorst}
"""pair selectors by name, as `--pairs.selection` spells them"""


def make_selector(name: str, seed: int = 0) -> PairSelector:
    """The selector `name` names, seeded."""
    if name not in SELECTORS:
        raise ValueError(f"--pairs.selection {name!r}: choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name](seed=seed)


__all__ = ["BestVsWorst", "Candidate", "Judge", "PairSelector", "RandomPairs", "SELECTORS", "make_selector", "to_pairs"]
