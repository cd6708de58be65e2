"""Passive exploration: a random pair of each prompt's responses (online DPO as in Guo et al. 2024, OAIF)."""
from __future__ import annotations

import random
from typing import ClassVar

from winnow.exploration.base import Candidate, Judge
from winnow.types import Completion, Prompt


class RandomPairs:
    """Two of the prompt's responses at random (two different texts when there are any), compared by the
    oracle: one query per prompt. Works with every oracle, including judges that only compare."""

    name: ClassVar[str] = "random"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        chosen = []
        for group in groups:
            first = self.rng.randrange(len(group))
            others = [j for j in range(len(group)) if j != first and group[j].text != group[first].text]
            others = others or [j for j in range(len(group)) if j != first]
            chosen.append((group[first], group[self.rng.choice(others)]))
        probabilities = judge.compare(prompts, [a for a, _ in chosen], [b for _, b in chosen])
        return [Candidate(p, a, b, prob) for p, (a, b), prob in zip(prompts, chosen, probabilities)]

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        """The rng's position (saved in checkpoints, so a resumed run picks the same pairs)."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
