"""The exploration protocol: which of a prompt's responses to ask the oracle about, and what to learn from it.

Each online preference iteration, for every prompt the actor sampled N responses (a group):

    candidates = selector.select(prompts, groups, judge)   # one pair per prompt; the selector asks `judge`
    pairs, metrics = to_pairs(candidates)                   # labelled pairs the learner trains on
    metrics |= selector.observe(candidates)                 # the oracle's answers, for a selector that learns

`judge` is the oracle as the loop hands it over: it counts what every call costs (`num_queries`: one per
compared pair, one per scored response), so methods are compared on the same accounting. A selector that
needs scalar rewards (best-vs-worst) says so with `needs_rewards`, and the run refuses a compare-only
oracle at start-up. A stateful selector (an ensemble reward model choosing where it is uncertain) keeps its
state on itself and updates it in `observe`.

A new selector is one file with a class like `RandomPairs` and one line in `SELECTORS`
(`winnow/exploration/__init__.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from winnow.oracles.base import PreferenceOracle, RewardOracle
from winnow.types import Completion, PreferencePair, Prompt


@dataclass
class Candidate:
    """A pair of one prompt's responses and the probability that `a` beats `b` (None: unjudged)."""

    prompt: Prompt
    a: Completion
    b: Completion
    probability: float | None
    labelled_by: str = "oracle"
    """who gave `probability`: "oracle" (a query, counted) or "model" (SEA's reward model: never a query, and
    never trained on by the reward model itself)"""


class Judge:
    """The oracle, as a selector sees it: batched `compare` and `reward` calls that count their cost and
    collect the oracle's own metrics (latency, failures) for the iteration's log."""

    def __init__(self, oracle: PreferenceOracle | RewardOracle) -> None:
        self.oracle = oracle
        self.num_queries = 0
        self.num_shadow_queries = 0
        self.metrics: dict[str, float] = {}

    @property
    def can_reward(self) -> bool:
        """True when the oracle gives scalar rewards, not only comparisons."""
        return isinstance(self.oracle, RewardOracle)

    def compare(self, prompts: list[Prompt], a: list[Completion], b: list[Completion], *,
                shadow: bool = False) -> list[float | None]:
        """P(a[i] beats b[i]) for each prompt, [N] (None: unjudged); costs one query per pair. A `shadow`
        comparison (a diagnostic of model-labelled pairs, never trained on) is counted apart."""
        if not prompts:
            return []
        result = self.oracle.compare([p.text for p in prompts], [c.text for c in a], [c.text for c in b],
                                     [p.reference for p in prompts], columns(prompts))
        if shadow:
            self.num_shadow_queries += len(prompts)
        else:
            self.num_queries += len(prompts)
        self.metrics.update(result.metrics)
        return result.probabilities

    def reward(self, prompts: list[Prompt], completions: list[Completion]) -> list[float | None]:
        """The oracle's score of each completion, [N] (None: unscored); costs one query per completion."""
        if not self.can_reward:
            raise ValueError(f"{type(self.oracle).__name__} only compares responses; a selector that needs scores "
                             f"(--pairs.selection best_vs_worst) needs a rule, remote or reward_model oracle: use "
                             f"--pairs.selection random")
        result = self.oracle.reward([p.text for p in prompts], [c.text for c in completions],
                                    [p.reference for p in prompts], columns(prompts))
        self.num_queries += len(completions)
        self.metrics.update(result.metrics)
        return result.scores


class PairSelector(Protocol):
    """Picks, for each prompt, the pair of its responses to learn from, and learns from the oracle's labels."""

    name: ClassVar[str]
    """the registry name (`--pairs.selection NAME`)"""
    needs_rewards: ClassVar[bool]
    """True when `select` calls `judge.reward` (the oracle must score, not only compare)"""

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        """One candidate per prompt; `groups[i]` holds prompt i's N responses."""
        ...

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        """The candidates with the oracle's answers; returns metrics for the log (a stateless selector: {})."""
        ...

    # Optional, for a selector with state (an rng, a learned model): `state_dict() -> dict` and
    # `load_state_dict(state)`. Checkpoints save it, so a resumed run selects as the uninterrupted one would.


def to_pairs(candidates: list[Candidate]) -> tuple[list[PreferencePair], dict[str, float]]:
    """Labelled pairs from candidates: chosen = a when p > 0.5, b when p < 0.5. A tie (p exactly 0.5, e.g.
    equal rule rewards) carries no label and a candidate the oracle could not judge carries none either:
    both are counted and never trained on. Pairs labelled by a reward model (SEA's mixed preference learning)
    train the policy like the others and are counted apart (`pref/model_labelled`)."""
    pairs, margins, num_tied, num_unjudged = [], [], 0, 0
    num_model = sum(c.labelled_by == "model" and c.probability not in (None, 0.5) for c in candidates)
    for c in candidates:
        if c.probability is None:
            num_unjudged += 1
        elif c.probability == 0.5:
            num_tied += 1
        else:
            a_wins = c.probability > 0.5
            chosen, rejected = (c.a, c.b) if a_wins else (c.b, c.a)
            probability = c.probability if a_wins else 1.0 - c.probability
            pairs.append(PreferencePair(c.prompt, chosen, rejected, probability))
            margins.append(2 * probability - 1)
    metrics = {"pref/pairs": float(len(pairs)), "pref/tied": float(num_tied), "pref/unjudged": float(num_unjudged),
               "pref/model_labelled": float(num_model),
               "pref/mean_margin": sum(margins) / len(margins) if margins else float("nan")}
    return pairs, metrics


def distinct_texts(group: list[Completion]) -> list[Completion]:
    """The group with repeated texts dropped (the first of each kept): a pair of identical texts says nothing."""
    seen, out = set(), []
    for c in group:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def columns(prompts: list[Prompt]) -> dict[str, list[Any]]:
    """The prompts' dataset columns as lists (the oracle's `columns` argument)."""
    return {key: [p.columns.get(key) for p in prompts] for key in prompts[0].columns} if prompts else {}
