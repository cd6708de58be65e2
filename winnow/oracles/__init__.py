"""Oracles: what judges the Actor's responses.

`make_oracle(config, needs=...)` builds the oracle `config.kind` names (see `winnow.oracles.config`):

    rule          the reward functions of `config.rule` (a `FunctionOracle`): a builtin name, `module:function`
                  or `path/to/file.py:function` each (see `load_reward_function`), summed with weights
    remote        a `RemoteOracle`: a client of an oracle service (`winnow serve-oracle`)
    reward_model  a `RewardModelOracle`: a sequence-classification model in this process
    judge         an `LLMJudgeOracle`: an LLM over an OpenAI-compatible API; it compares, it never scores
    pairwise      a `PairwiseOracle`: a pairwise preference model in this process; it compares, it never scores
                  (served: `--oracle.kind remote --oracle.remote.pairwise`, a `ServedPairwiseOracle`)

`FunctionOracle` and `load_reward_function` are imported on first use (PEP 562 `__getattr__`), because
they pull in torch through `winnow.types`: the math grader's worker processes import this package, and
should not each pay torch's import time and memory.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable

from winnow.oracles.config import (ORACLE_KINDS, JudgeOracleConfig, Need, OracleConfig, PairwiseOracleConfig,
                                   RemoteOracleConfig, RewardModelOracleConfig, RuleOracleConfig, capability_kind,
                                   check_capability, check_oracle_config, unused_oracle_settings)
from winnow.oracles.math import MathGrader, extract_answer, grade

if TYPE_CHECKING:
    from winnow.oracles.base import PreferenceOracle, RewardOracle
    from winnow.oracles.functions import FunctionOracle, load_reward_function

__all__ = ["FunctionOracle", "JudgeOracleConfig", "MathGrader", "ORACLE_KINDS", "OracleConfig", "PairwiseOracleConfig",
           "RemoteOracleConfig",
           "RewardModelOracleConfig", "RuleOracleConfig", "check_oracle_config", "extract_answer", "grade",
           "load_reward_function", "make_oracle", "make_preference_oracle", "unused_oracle_settings"]


def make_oracle(config: OracleConfig, *, needs: Need | Iterable[Need] = "reward") -> RewardOracle | PreferenceOracle:
    """The oracle `config.kind` names, able to do what the caller `needs`: "reward" (a scalar per response: RL,
    best-vs-worst pairs, accuracy), "compare" (P(a beats b): random pairs, win rates) or both.

    Raises ValueError when the kind can't (a judge or a pairwise model gives no reward). When comparing is needed, a rule or remote
    oracle is wrapped so that it compares through Bradley-Terry on its rewards at `preference_temperature`, and
    still rewards. Call the oracle's `close()` when done: it stops the math grader's workers."""
    check_capability(capability_kind(config), needs)
    needs = (needs,) if isinstance(needs, str) else tuple(needs)
    if config.kind == "pairwise":
        from winnow.oracles.pairwise import PairwiseOracle

        return PairwiseOracle.from_pretrained(config.pairwise.path, batch_size=config.pairwise.batch_size,
                                              max_length=config.pairwise.max_length,
                                              temperature=config.preference_temperature)
    if config.kind == "reward_model":
        from winnow.oracles.reward_model import RewardModelOracle

        return RewardModelOracle.from_pretrained(config.reward_model.path, batch_size=config.reward_model.batch_size,
                                                 max_length=config.reward_model.max_length,
                                                 temperature=config.preference_temperature)
    if config.kind == "judge":
        from winnow.oracles.judge import LLMJudgeOracle

        judge = config.judge
        return LLMJudgeOracle.from_env(judge.model, judge.base_url, judge.api_key_env,
                                       max_concurrency=judge.max_concurrency, max_retries=config.max_retries,
                                       timeout_s=judge.timeout_s)
    if config.kind == "remote":
        from winnow.oracles.remote import RemoteOracle

        oracle = RemoteOracle.from_config(config.remote)
        if config.remote.pairwise:
            from winnow.oracles.pairwise import ServedPairwiseOracle

            return ServedPairwiseOracle(oracle)
    else:
        oracle = _rule_oracle(config)
    if "compare" in needs:
        from winnow.oracles.preference import RewardPreferenceOracle

        return RewardPreferenceOracle(oracle, config.preference_temperature)
    return oracle


def _rule_oracle(config: OracleConfig) -> FunctionOracle:
    from winnow.oracles.functions import FunctionOracle, load_reward_function

    rule = config.rule
    functions = []
    for spec, weight in zip(rule.rewards, rule.reward_weights or [1.0] * len(rule.rewards)):
        name, fn = load_reward_function(spec, math_timeout_s=rule.math_timeout_s,
                                        math_num_workers=rule.math_num_workers)
        functions.append((name, fn, weight))
    return FunctionOracle(functions, max_retries=config.max_retries)


def make_preference_oracle(config: OracleConfig) -> PreferenceOracle:
    """Deprecated alias of `make_oracle(config, needs="compare")`, kept for one release."""
    warnings.warn("make_preference_oracle(config) is deprecated; use make_oracle(config, needs='compare')",
                  DeprecationWarning, stacklevel=2)
    return make_oracle(config, needs="compare")


def __getattr__(name: str) -> Any:
    if name in ("FunctionOracle", "load_reward_function"):
        from winnow.oracles import functions

        return getattr(functions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
