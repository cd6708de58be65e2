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
    from winnow.oracles.base import PreferenceOracle, RewardOracle
    from winnow.oracles.functions import FunctionOracle, load_reward_function

__all__ = ["FunctionOracle", "MathGrader", "OracleConfig", "extract_answer", "grade", "load_reward_function",
           "make_oracle", "make_preference_oracle"]


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
    # -- preference oracles (`winnow train dpo|ipo|slic|simpo`, win rates): see `make_preference_oracle`
    kind: str = "rule"
    """how preference algorithms compare two responses: rule (the rewards above, Bradley-Terry), reward_model
    (a sequence-classification model at reward_model_path, Bradley-Terry) or judge (an LLM judge over an
    OpenAI-compatible API)"""
    preference_temperature: float = 1.0
    """Bradley-Terry temperature: P(a beats b) = sigmoid((r_a - r_b) / temperature) for rule and reward_model"""
    reward_model_path: str | None = None
    """kind=reward_model: a directory (or hub id) with a transformers sequence-classification model"""
    reward_model_batch_size: int = 32
    """kind=reward_model: (prompt, response) pairs scored per forward pass"""
    judge_model: str = "gpt-4o-mini"
    """kind=judge: the model name sent to the chat-completions API"""
    judge_base_url: str | None = None
    """kind=judge: the API's base URL, e.g. http://127.0.0.1:8000/v1 for a local vLLM server; None is OpenAI's"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """kind=judge: the environment variable holding the API key (keys never go in configs or flags)"""
    judge_max_concurrency: int = 8
    """kind=judge: the most API calls in flight at once"""
    judge_timeout_s: float = 30.0
    """kind=judge: seconds before a call is abandoned and retried"""

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
        if self.kind not in PREFERENCE_ORACLE_KINDS:
            problems.append(f"kind={self.kind!r} must be one of {', '.join(PREFERENCE_ORACLE_KINDS)}")
        if not self.preference_temperature > 0:
            problems.append(f"preference_temperature={self.preference_temperature} must be > 0")
        if self.kind == "reward_model" and not self.reward_model_path:
            problems.append("kind='reward_model' needs --oracle.reward-model-path (a sequence-classification model)")
        if self.judge_max_concurrency < 1:
            problems.append(f"judge_max_concurrency={self.judge_max_concurrency} must be >= 1")
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


PREFERENCE_ORACLE_KINDS = ("rule", "reward_model", "judge")
"""the values of `OracleConfig.kind`"""


def make_preference_oracle(config: OracleConfig) -> PreferenceOracle:
    """The preference oracle `config.kind` names; call its `close()` when done."""
    if config.kind == "reward_model":
        from winnow.oracles.reward_model import RewardModelOracle

        return RewardModelOracle.from_pretrained(config.reward_model_path, batch_size=config.reward_model_batch_size,
                                                 temperature=config.preference_temperature)
    if config.kind == "judge":
        from winnow.oracles.judge import LLMJudgeOracle

        return LLMJudgeOracle.from_env(config.judge_model, config.judge_base_url, config.judge_api_key_env,
                                       max_concurrency=config.judge_max_concurrency, max_retries=config.max_retries,
                                       timeout_s=config.judge_timeout_s)
    from winnow.oracles.preference import RewardPreferenceOracle

    return RewardPreferenceOracle(make_oracle(config), config.preference_temperature)


def __getattr__(name: str) -> Any:
    if name in ("FunctionOracle", "load_reward_function"):
        from winnow.oracles import functions

        return getattr(functions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
