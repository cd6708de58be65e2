"""A test-only example of a stateful pair selector that learns from `observe`, in one file. It estimates from
the oracle's labels whether the shorter of two responses tends to win. While it is unsure it asks about the
shortest and the longest response (the pair that tells it most); once it is confident that short answers win,
it asks about the two shortest (to learn which short answer is better). Registering it is one line:
`SELECTORS["length"] = LengthSelector`."""
from __future__ import annotations

from typing import ClassVar

from winnow.exploration import Candidate, Judge
from winnow.types import Completion, Prompt


class LengthSelector:
    name: ClassVar[str] = "length"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.shorter_wins = 0
        self.longer_wins = 0

    @property
    def shorter_win_rate(self) -> float:
        """P(shorter wins), Laplace-smoothed: 0.5 before any label."""
        return (self.shorter_wins + 1) / (self.shorter_wins + self.longer_wins + 2)

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        pairs = []
        for group in groups:
            by_length = sorted(group, key=lambda c: len(c.text))
            confident = self.shorter_win_rate > 0.8
            pairs.append((by_length[0], by_length[1] if confident else by_length[-1]))
        probabilities = judge.compare(prompts, [a for a, _ in pairs], [b for _, b in pairs])
        return [Candidate(p, a, b, q) for p, (a, b), q in zip(prompts, pairs, probabilities)]

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        for c in labelled:
            if c.probability is None or c.probability == 0.5 or len(c.a.text) == len(c.b.text):
                continue
            a_wins = c.probability > 0.5
            if a_wins == (len(c.a.text) < len(c.b.text)):
                self.shorter_wins += 1
            else:
                self.longer_wins += 1
        return {"explore/shorter_win_rate": self.shorter_win_rate}
