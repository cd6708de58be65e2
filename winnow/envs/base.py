"""The environment protocol of multi-turn episodes: gym-shaped, and the same shape as GEM's `gem.Env`.

    observation, info = env.reset(seed)
    observation, reward, terminated, truncated, info = env.step(action)

Observations and actions are text. `terminated` says the task ended (solved, failed, out of guesses): the
return is final. `truncated` says it was cut short from outside the task (a time limit): the return is
partial. A GRPO group needs every sample to start from one initial state: `EnvFactory` makes fresh copies, and
copies reset with the same seed start in the same state (the adapters and the built-in envs guarantee it; a
user's class must too, which `check_same_start` tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Env(Protocol):
    """A text environment: GEM's `Env` fits as it is."""

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode; the same seed gives the same initial state. Returns (observation, info)."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply the policy's response. Returns (observation, reward, terminated, truncated, info)."""
        ...


EnvFactory = Callable[[], Env]
"""Makes a fresh copy of one environment (one per episode, so episodes share no state)."""


class EnvUnavailableError(ValueError):
    """An environment cannot be made on this machine (a missing package, data it cannot download): the message
    says what is missing and how to get it."""


@dataclass
class StepResult:
    """One `Env.step`, as the episode runner records it."""

    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result: tuple) -> "StepResult":
        """Check a step's 5-tuple (a wrong shape is the environment's bug, said plainly)."""
        if not isinstance(result, tuple) or len(result) != 5:
            raise TypeError(f"Env.step must return (observation, reward, terminated, truncated, info), got {result!r}")
        observation, reward, terminated, truncated, info = result
        return cls(str(observation), float(reward), bool(terminated), bool(truncated), dict(info or {}))


def check_same_start(factory: EnvFactory, seed: int, num_copies: int = 2) -> str:
    """The first observation of `num_copies` fresh copies reset with `seed`; raises if they differ (a GRPO
    group's samples would then answer different tasks and its baseline would mean nothing)."""
    observations = [factory().reset(seed=seed)[0] for _ in range(num_copies)]
    if any(o != observations[0] for o in observations):
        raise ValueError(f"copies of the environment reset with seed {seed} start differently ({observations[0]!r} vs "
                         f"{next(o for o in observations if o != observations[0])!r}): reset(seed) must fix the "
                         f"initial state, so that a group's episodes start alike")
    return observations[0]
