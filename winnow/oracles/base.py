"""The Oracle protocol: what judges the Actor's responses."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from winnow.types import PreferenceResult, RewardResult

RewardFunction = Callable[..., Sequence[float | None]]
"""`fn(prompts: list[str], completions: list[str], **columns) -> list[float]`, the ecosystem's usual
signature (TRL's `reward_funcs`). `columns` holds the dataset row's other columns as lists, always
including `reference` (the answer column, or None per row). An entry may be None when the function
could not score that completion (a grader that timed out); winnow counts it and never trains on it."""


@runtime_checkable
class RewardOracle(Protocol):
    """Scores completions. Every oracle batches, and reports its own latency and failures in
    `RewardResult.metrics`."""

    def reward(
        self,
        prompts: list[str],
        completions: list[str],
        references: list[str | None],
        columns: dict[str, list[Any]] | None = None,
    ) -> RewardResult:
        """Score N completions. `prompts[i]` is the prompt text `completions[i]` answers; `references[i]`
        its reference answer; `columns` the other dataset columns, N values each. Returns N scores,
        None where a completion could not be scored after retries."""
        ...

    def close(self) -> None:
        """Release worker processes or connections."""
        ...


@runtime_checkable
class PreferenceOracle(Protocol):
    """Compares two responses to the same prompt (for preference learning and win rates). Every oracle
    batches, and reports its own latency and failures in `PreferenceResult.metrics`."""

    def compare(
        self,
        prompts: list[str],
        completions_a: list[str],
        completions_b: list[str],
        references: list[str | None] | None = None,
        columns: dict[str, list[Any]] | None = None,
    ) -> PreferenceResult:
        """For each i, the probability that `completions_a[i]` is a better answer to `prompts[i]` than
        `completions_b[i]`, [N]; None where it could not judge after retries. `references` and `columns`
        are the dataset's, as for `RewardOracle.reward` (a rule needs the reference answer)."""
        ...

    def close(self) -> None:
        """Release worker processes or connections."""
        ...
