"""Preferences from scores: any reward oracle becomes a preference oracle through Bradley-Terry.

Bradley & Terry 1952: P(a beats b) = sigma((r_a - r_b) / temperature). With a rule reward (exact match, math,
closeness to the answer) equal scores give exactly 0.5, which the trainer treats as a tie and skips, and the
scores themselves stay available (`reward`) for best-vs-worst pair selection.
"""
from __future__ import annotations

import math
from typing import Any

from winnow.oracles.base import RewardOracle
from winnow.types import PreferenceResult, RewardResult


def bradley_terry(score_a: float | None, score_b: float | None, temperature: float = 1.0) -> float | None:
    """sigma((score_a - score_b) / temperature), computed without overflow for any score gap; None when either
    side is unscored (the pair is then unjudged, never a guess)."""
    if score_a is None or score_b is None:
        return None
    z = (score_a - score_b) / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class RewardPreferenceOracle:
    """A `PreferenceOracle` (and still a `RewardOracle`) on top of any reward oracle: both responses are scored
    in one batched `reward` call and compared with Bradley-Terry. A pair with an unscored side is unjudged."""

    def __init__(self, oracle: RewardOracle, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"Bradley-Terry temperature={temperature} must be > 0 (--oracle.preference-temperature)")
        self.oracle = oracle
        self.temperature = temperature

    def reward(self, prompts: list[str], completions: list[str], references: list[str | None],
               columns: dict[str, list[Any]] | None = None) -> RewardResult:
        return self.oracle.reward(prompts, completions, references, columns)

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None,
                columns: dict[str, list[Any]] | None = None) -> PreferenceResult:
        n = len(prompts)
        if not len(completions_a) == len(completions_b) == n:
            raise ValueError(f"compare got {n} prompts, {len(completions_a)} a and {len(completions_b)} b responses; "
                             f"give one of each per prompt")
        references = list(references) if references is not None else [None] * n
        doubled = None if columns is None else {k: list(v) + list(v) for k, v in columns.items()}
        result = self.oracle.reward(prompts + prompts, completions_a + completions_b, references + references, doubled)
        scores_a, scores_b = result.scores[:n], result.scores[n:]
        probabilities = [bradley_terry(a, b, self.temperature) for a, b in zip(scores_a, scores_b)]
        return PreferenceResult(probabilities, dict(result.metrics))

    def close(self) -> None:
        self.oracle.close()
