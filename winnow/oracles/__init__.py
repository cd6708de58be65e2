"""Oracles: what judges the Actor's responses.

`make_oracle(OracleConfig(rewards=["math", "boxed_format"], reward_weights=[1.0, 0.1]))` builds a
`FunctionOracle` that adds a math verifier and a format bonus. A reward is a builtin name, `module:function`
or `path/to/file.py:function` (see `load_reward_function`).

With `url` set, `make_oracle` returns a `RemoteOracle`: a client of an oracle service (`winnow serve-oracle`).

`FunctionOracle` and `load_reward_function` are imported on first use (PEP 562 `__getattr__`), because
they pull in torch through `winnow.types`: the math grader's worker processes import this package, and
should not each pay torch's import time and memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from winnow.oracles.math import MathGrader, extract_answer, grade

if TYPE_CHECKING:
    from winnow.oracles.base import RewardOracle
    from winnow.oracles.functions import FunctionOracle, load_reward_function

__all__ = ["FunctionOracle", "MathGrader", "OracleConfig", "extract_answer", "grade", "load_reward_function",
           "make_oracle"]


@dataclass
class OracleConfig:
    """Which reward functions score responses, and how the math grader runs."""

    rewards: list[str] = field(default_factory=lambda: ["exact"])
    """reward functions: builtins (math, exact, boxed_format), 'module:function' or 'path/to/file.py:function'"""
    reward_weights: list[float] | None = None
    """one weight per reward, the total is their weighted sum; None weighs each 1.0"""
    math_timeout_s: float = 5.0
    """seconds to grade one math answer; one that takes longer is unscored (and retried once)"""
    math_num_workers: int = 2
    """processes grading math answers in parallel"""
    max_retries: int = 2
    """times to call a reward function again after it raised, before its completions go unscored"""
    url: str | None = None
    """an oracle service (`winnow serve-oracle`) to score with, e.g. http://127.0.0.1:8000; when set, the
    service's rewards score and the fields above are the server's business, the fields below the client's"""
    token_env: str = "WINNOW_ORACLE_TOKEN"
    """environment variable holding the service's token (a flag would show it in `ps`); unset: send none"""
    timeout_s: float = 60.0
    """seconds to wait for one request's reply before retrying it"""
    give_up_after_s: float = 600.0
    """seconds the service may stay unreachable (the actor paused, retrying) before the run stops with an error"""
    max_in_flight: int = 4
    """requests to the service in flight at once"""
    request_batch_size: int = 64
    """completions per request; the service batches requests from all clients on top of this"""

    def __post_init__(self) -> None:
        problems = []
        if not self.rewards:
            problems.append("rewards is empty; name at least one (e.g. exact or math)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards "
                            f"{self.rewards}; give one weight per reward, in the same order")
        if self.math_timeout_s <= 0:
            problems.append(f"math_timeout_s={self.math_timeout_s} must be > 0")
        if self.math_num_workers < 1:
            problems.append(f"math_num_workers={self.math_num_workers} must be >= 1")
        if self.max_retries < 0:
            problems.append(f"max_retries={self.max_retries} must be >= 0")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            problems.append(f"url={self.url!r} must start with http:// or https://")
        if self.timeout_s <= 0 or self.give_up_after_s <= 0 or self.max_in_flight < 1 or self.request_batch_size < 1:
            problems.append("timeout_s and give_up_after_s must be > 0, max_in_flight and request_batch_size >= 1")
        if problems:
            raise ValueError("invalid OracleConfig: " + "; ".join(problems))


def make_oracle(config: OracleConfig) -> RewardOracle:
    """The oracle `config` describes. Call its `close()` when done: it stops the math grader's workers."""
    from winnow.oracles.functions import FunctionOracle, load_reward_function

    if config.url is not None:
        from winnow.oracles.remote import RemoteOracle

        return RemoteOracle.from_config(config)

    weights = config.reward_weights or [1.0] * len(config.rewards)
    functions = []
    for spec, weight in zip(config.rewards, weights):
        name, fn = load_reward_function(spec, math_timeout_s=config.math_timeout_s,
                                        math_num_workers=config.math_num_workers)
        functions.append((name, fn, weight))
    return FunctionOracle(functions, max_retries=config.max_retries)


def __getattr__(name: str) -> Any:
    if name in ("FunctionOracle", "load_reward_function"):
        from winnow.oracles import functions

        return getattr(functions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
