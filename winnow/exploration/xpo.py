"""XPO's pairs (Xie et al. 2024, "Exploratory Preference Optimization"): one response from the policy, one from
the reference policy, labelled by the oracle. The objective `winnow.algorithms.preference.XPO` adds alpha times
the policy's log-probability of the reference's response to DPO's loss.

The reference samples come from `reference_generate`, which the preference recipe builds: a second engine
holding the frozen initial policy (never synced), so the cost is one more copy of the model in memory and one
more sample per prompt each iteration. The policy's sample is the first of its group, so
`--rollout.num-samples 2` wastes the least generation.
"""
from __future__ import annotations

from typing import Callable, ClassVar

from winnow.exploration.base import Candidate, Judge
from winnow.types import Completion, Prompt

ReferenceGenerate = Callable[[list[Prompt], int], list[Completion]]
"""(prompts [P], call number 1, 2, ... which seeds the sampling) -> one completion each from the reference policy,
`sampled_by="reference"`"""


class XPOPairs:
    """The policy's first response against one fresh sample of the reference policy."""

    name: ClassVar[str] = "xpo"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, seed: int = 0, reference_generate: ReferenceGenerate | None = None) -> None:
        if reference_generate is None:
            raise ValueError("--pairs.selection xpo needs a reference engine (the preference recipe builds one)")
        self.reference_generate = reference_generate
        self.num_reference_calls = 0
        """reference samplings so far: the next call's seed, saved in checkpoints so a resumed run draws the same
        reference responses as the uninterrupted one"""

    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        self.num_reference_calls += 1
        reference = self.reference_generate(prompts, self.num_reference_calls)
        ours = [g[0] for g in groups]
        probabilities = judge.compare(prompts, ours, reference)
        return [Candidate(p, a, b, prob) for p, a, b, prob in zip(prompts, ours, reference, probabilities)]

    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"num_reference_calls": self.num_reference_calls}

    def load_state_dict(self, state: dict) -> None:
        self.num_reference_calls = state["num_reference_calls"]
