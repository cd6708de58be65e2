"""APL: active preference learning (Muldrew et al. 2024, "Active Preference Learning for Large Language
Models"): of an over-sampled batch of prompts, ask the oracle only about the prompts the policy is least sure
how to answer, and about the pair its implicit reward model separates most.

Per prompt with N responses:
    entropy(x) ~ -(1/N) sum_k log pi(y_k | x)           # the samples' negative mean sequence log-probability
    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))    # DPO's implicit reward
Keep the `keep_fraction` of prompts with the *highest* entropy (over-sample with --rollout.prompts-per-iteration);
for each, the pair with the largest |r(y1) - r(y2)| (its best against its worst). `apl-certainty` is the
paper's certainty-only variant: every prompt's first two samples, the prompts with the largest |margin| kept.

log pi is the engine's sampling log-probability (exact at temperature 1); log pi_ref comes from the learner's
reference model through `reference_logprobs`, which the preference recipe hands over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from winnow.exploration.base import Candidate, Judge, distinct_texts
from winnow.types import Completion, Prompt

ReferenceLogprobs = Callable[[list[Completion]], list[float]]
"""completions [M] -> their summed log-probabilities under the reference policy [M]"""


@dataclass
class APLConfig:
    """APL's settings (`--pairs.apl.*`)."""

    keep_fraction: float = 0.5
    """fraction of each iteration's prompts sent to the oracle (the rest are sampled but not queried)"""
    beta: float = 0.1
    """beta of the implicit reward beta * log(pi / pi_ref) (match the objective's --algo.beta)"""

    def __post_init__(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"--pairs.apl.keep-fraction {self.keep_fraction} must be in (0, 1]")


class APL:
    """Highest-entropy prompts, largest implicit-reward margin pair."""

    name: ClassVar[str] = "apl"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, seed: int = 0, config: APLConfig | None = None,
                 reference_logprobs: ReferenceLogprobs | None = None) -> None:
        if reference_logprobs is None:
            raise ValueError(f"--pairs.selection {self.name} needs the reference policy's log-probabilities "
                             "(train with a reference objective: dpo, ipo or slic)")
        self.config = config or APLConfig()
        self.reference_logprobs = reference_logprobs

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        num_kept = max(1, round(self.config.keep_fraction * len(prompts)))
        entropy = [-sum(sum(c.logprobs) for c in g) / len(g) for g in groups]
        kept = sorted(range(len(prompts)), key=lambda k: entropy[k], reverse=True)[:num_kept]
        chosen = [self._widest_pair(groups[k]) for k in kept]
        return _ask(judge, [prompts[k] for k in kept], chosen)

    def _widest_pair(self, group: list[Completion]) -> tuple[Completion, Completion]:
        distinct = distinct_texts(group)
        if len(distinct) < 2:
            return group[0], group[-1]
        rewards = self.implicit_rewards(distinct)
        best = max(range(len(distinct)), key=lambda k: rewards[k])
        worst = min(range(len(distinct)), key=lambda k: rewards[k])
        return distinct[best], distinct[worst]

    def implicit_rewards(self, completions: list[Completion]) -> list[float]:
        """beta * (log pi - log pi_ref) of each completion, [M]."""
        reference = self.reference_logprobs(completions)
        return [self.config.beta * (sum(c.logprobs) - ref) for c, ref in zip(completions, reference)]

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        return {}


class APLCertainty(APL):
    """The certainty-only variant: two samples per prompt, the prompts with the largest |margin| kept."""

    name: ClassVar[str] = "apl-certainty"

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        num_kept = max(1, round(self.config.keep_fraction * len(prompts)))
        rewards = self.implicit_rewards([c for g in groups for c in g[:2]])
        margin = [abs(rewards[2 * k] - rewards[2 * k + 1]) for k in range(len(prompts))]
        kept = sorted(range(len(prompts)), key=lambda k: margin[k], reverse=True)[:num_kept]
        return _ask(judge, [prompts[k] for k in kept], [(groups[k][0], groups[k][1]) for k in kept])


def _ask(judge: Judge, prompts: list[Prompt], pairs: list[tuple[Completion, Completion]]) -> list[Candidate]:
    probabilities = judge.compare(prompts, [a for a, _ in pairs], [b for _, b in pairs])
    return [Candidate(p, a, b, prob) for p, (a, b), prob in zip(prompts, pairs, probabilities)]
