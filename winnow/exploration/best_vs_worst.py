"""Best-vs-worst: score every response and pair the extremes (Xu et al. 2023's online DPO recipes)."""
from __future__ import annotations

from typing import ClassVar

from winnow.exploration.base import Candidate, Judge
from winnow.oracles.preference import bradley_terry
from winnow.types import Completion, Prompt


class BestVsWorst:
    """Score every response (one query per response: N per prompt) and pair the best with the worst, the most
    informative pair when the oracle gives scalar rewards. P(best beats worst) is Bradley-Terry on the two
    scores, at the oracle's own temperature. A prompt with fewer than 2 scored responses is unjudged."""

    name: ClassVar[str] = "best_vs_worst"
    needs_rewards: ClassVar[bool] = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # deterministic: the seed is unused

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        repeated = [p for p, group in zip(prompts, groups) for _ in group]
        scores = judge.reward(repeated, [c for group in groups for c in group])
        temperature = getattr(judge.oracle, "temperature", 1.0)
        candidates, start = [], 0
        for prompt, group in zip(prompts, groups):
            scored = [(s, c) for s, c in zip(scores[start:start + len(group)], group) if s is not None]
            start += len(group)
            if len(scored) < 2:
                candidates.append(Candidate(prompt, group[0], group[-1], None))
                continue
            (best_score, best), (worst_score, worst) = max(scored, key=_score), min(scored, key=_score)
            candidates.append(Candidate(prompt, best, worst, bradley_terry(best_score, worst_score, temperature)))
        return candidates

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        return {}


def _score(item: tuple[float, Completion]) -> float:
    return item[0]
