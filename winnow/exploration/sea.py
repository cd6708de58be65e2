"""SEA: sample-efficient alignment (Liu et al. 2024, arXiv 2411.01493): ask the oracle about the pair an
epistemic reward model is most useful on, instead of a random one.

Each iteration, per prompt (its N responses, identical texts merged):

    features = phi(x, y) for every response                   # frozen backbone (`features.py`), no gradients
    R = ensemble(features)                                     # [E, n]: every member's reward of every response
    (i, j) = rule(R)                                           # one oracle comparison per prompt
    ... the oracle labels (i, j); `observe` adds the labelled pair to the replay buffer and trains the ensemble

The rules (one class each; `--pairs.selection NAME`):
- `sea-ee`     explore-exploit Thompson sampling: members in random order; first = argmax of the first member,
               second = argmax of the first member whose argmax differs (the paper's "EE").
- `sea-bai`    best-arm identification: first = argmax of one random member; second = the response whose reward
               difference to the first the members disagree on most, argmax_j Var_e(R_e[first] - R_e[j]).
- `sea-uncertainty`  the pair with the largest Var_e(R_e[i] - R_e[j]) over all pairs.
- `sea-passive`      a random pair; the reward model is still trained (isolates what the rules add).
- `sea-greedy`       the ensemble mean's best against its worst (exploits the reward model without Thompson
               sampling: isolates what the posterior sampling adds).
When a rule's two picks coincide (`sea/pick_clash`), the second is a random other response
(`--pairs.sea.random-on-clash`, default) or the ensemble mean's best other.

Mixed preference learning (`--pairs.sea.mixed`): after `mixed_burn_in` iterations, once the ensemble has
trained, a fraction of the prompts is labelled by the ensemble itself (its most confident pair, chosen =
the higher ensemble-mean reward) and is *not* sent to the oracle: those pairs train the policy, never the
reward model, and cost no query. With `--pairs.sea.shadow-queries` the oracle is asked about them anyway, as a
diagnostic of the model's agreement, counted apart (`counts/shadow_queries`) and never trained on.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import ClassVar, TYPE_CHECKING

from winnow.exploration.base import Candidate, Judge, distinct_texts
from winnow.exploration.ensemble_config import EnsembleConfig
from winnow.exploration.features import Featurizer, make_featurizer
from winnow.lazy import lazy_function, lazy_import
from winnow.types import Completion, Prompt

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")
# the ensemble's module defines a torch.nn.Module
EpistemicRewardModel = lazy_function("winnow.exploration.ensemble", "EpistemicRewardModel")


@dataclass
class SEAConfig:
    """SEA's settings (`--pairs.sea.*`); defaults from the seed framework."""

    features: str = "minilm"
    """the frozen feature backbone phi(x, y): minilm, policy (the initial policy's last-token hidden state), or a
    user function module:function / file.py:function taking (prompts, responses) and returning a [M, d] tensor"""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    """the epistemic reward model"""
    random_on_clash: bool = True
    """when a rule's two picks coincide, take a random other response (else the ensemble mean's best other)"""
    mixed: bool = False
    """mixed preference learning: label `mixed_fraction` of the prompts with the reward model, not the oracle"""
    mixed_fraction: float = 0.3
    """fraction of each iteration's prompts the reward model labels (with --pairs.sea.mixed)"""
    mixed_burn_in: int = 10
    """iterations with every prompt sent to the oracle before the reward model labels any"""
    shadow_queries: bool = False
    """also ask the oracle about model-labelled pairs, only to measure agreement (counted apart, never trained on)"""

    def __post_init__(self) -> None:
        if not 0 <= self.mixed_fraction < 1:
            raise ValueError(f"--pairs.sea.mixed-fraction {self.mixed_fraction} must be in [0, 1)")


class SEASelector:
    """The shared machinery: features, the ensemble, mixed labelling, `observe`. A rule is `pick`."""

    name: ClassVar[str] = "sea"
    needs_rewards: ClassVar[bool] = False

    def __init__(self, seed: int = 0, config: SEAConfig | None = None, featurize: Featurizer | None = None) -> None:
        self.config = config or SEAConfig()
        self.featurize = featurize or make_featurizer(self.config.features)
        self.seed, self.rng = seed, random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.reward_model: EpistemicRewardModel | None = None  # built on the first features (their size)
        self.iteration = 0
        self.pending: dict[int, tuple[Tensor, Tensor, float, float]] = {}  # id(candidate) -> (phi_a, phi_b, margin, std)
        self.metrics: dict[str, float] = {}
        self.shadow_agreement: float | None = None  # set by a shadow check, logged by the next `observe`

    def state_dict(self) -> dict:
        """The iteration count, both generators and the ensemble (None before the first features built it), so a
        resumed run picks, labels and trains exactly as the uninterrupted one (saved in checkpoints)."""
        return {"iteration": self.iteration, "rng": self.rng.getstate(), "generator": self.generator.get_state(),
                "reward_model": None if self.reward_model is None else self.reward_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        saved = state["reward_model"]
        if saved is not None:
            self.reward_model = EpistemicRewardModel(saved["input_size"], self.config.ensemble, seed=self.seed)
            self.reward_model.load_state_dict(saved)

    # ------------------------------------------------------------------ the rule
    def pick(self, rewards: Tensor) -> tuple[int, int]:
        """rewards [E, n] (n >= 2 distinct responses) -> the pair (first, second); second == first is a clash."""
        raise NotImplementedError

    # ------------------------------------------------------------------ select
    def select(self, prompts: list[Prompt], groups: list[list[Completion]], judge: Judge) -> list[Candidate]:
        self.iteration += 1
        groups = [distinct_texts(g) for g in groups]
        kept = [(p, g) for p, g in zip(prompts, groups) if len(g) >= 2]
        flat_p = [p for p, g in kept for _ in g]
        flat_c = [c for _, g in kept for c in g]
        features = self.featurize(flat_p, flat_c).float() if flat_c else torch.zeros(0, 1)  # [M, d]
        if self.reward_model is None and flat_c:
            self.reward_model = EpistemicRewardModel(features.shape[1], self.config.ensemble, seed=self.seed)
        rewards = self.reward_model.rewards(features) if flat_c else features.T  # [E, M]

        by_model = self._model_labelled(len(kept))
        oracle_rows, model_rows, clashes, start = [], [], 0, 0
        for row, (prompt, group) in enumerate(kept):
            n = len(group)
            r, phi = rewards[:, start:start + n], features[start:start + n]  # [E, n], [n, d]
            start += n
            if row in by_model:
                model_rows.append((prompt, group, r, phi, *_most_confident(r)))
                continue
            i, j = self.pick(r)
            if i == j:
                clashes += 1
                j = self._other(r, i)
            oracle_rows.append((prompt, group, r, phi, i, j))

        candidates = self._ask_oracle(oracle_rows, judge) + self._label_by_model(model_rows, judge)
        self.metrics = {
            "sea/pick_clash": clashes / max(len(oracle_rows), 1),
            "sea/model_labelled_fraction": len(model_rows) / max(len(kept), 1),
            "sea/single_text_prompts": float(len(prompts) - len(kept)),
        }
        return candidates

    def _ask_oracle(self, rows, judge: Judge) -> list[Candidate]:
        probabilities = judge.compare([r[0] for r in rows], [r[1][r[4]] for r in rows], [r[1][r[5]] for r in rows])
        candidates = []
        for (prompt, group, r, phi, i, j), p in zip(rows, probabilities):
            c = Candidate(prompt, group[i], group[j], p)
            diff = r[:, i] - r[:, j]  # [E]
            self.pending[id(c)] = (phi[i], phi[j], float(diff.mean()), float(diff.std()))
            candidates.append(c)
        return candidates

    def _label_by_model(self, rows, judge: Judge) -> list[Candidate]:
        """The ensemble's own labels: chosen = the higher mean reward, P = sigmoid(mean margin); no query."""
        candidates = [Candidate(prompt, group[i], group[j], 1 / (1 + math.exp(-margin)), labelled_by="model")
                      for prompt, group, r, phi, i, j, margin in rows]
        if self.config.shadow_queries and candidates:
            answers = judge.compare([c.prompt for c in candidates], [c.a for c in candidates],
                                    [c.b for c in candidates], shadow=True)
            agree = [p > 0.5 for p in answers if p is not None and p != 0.5]
            self.shadow_agreement = sum(agree) / len(agree) if agree else float("nan")
        return candidates

    def _model_labelled(self, num_prompts: int) -> set[int]:
        """Which of this iteration's prompts the reward model labels (none before the burn-in ends)."""
        cfg = self.config
        trained = self.reward_model is not None and len(self.reward_model.buffer) >= cfg.ensemble.batch_size
        if not cfg.mixed or self.iteration <= cfg.mixed_burn_in or not trained:
            return set()
        return set(self.rng.sample(range(num_prompts), round(cfg.mixed_fraction * num_prompts)))

    def _other(self, rewards: Tensor, first: int) -> int:
        others = [k for k in range(rewards.shape[1]) if k != first]
        if self.config.random_on_clash:
            return self.rng.choice(others)
        mean = rewards.mean(0)
        return max(others, key=lambda k: float(mean[k]))

    # ------------------------------------------------------------------ best-of-N evaluation
    def best_of(self, prompts: list[Prompt], groups: list[list[Completion]]) -> list[int]:
        """For each prompt, the index of its response with the highest ensemble-mean reward (SEA's best-of-N
        evaluation); 0, the first sample, before the ensemble exists. Reads features only: no query, no state."""
        if self.reward_model is None:
            return [0] * len(groups)
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        features = self.featurize(flat_p, [c for g in groups for c in g]).float()  # [M, d]
        with torch.no_grad():
            mean = self.reward_model.rewards(features).mean(0)  # [M]
        picks, start = [], 0
        for g in groups:
            picks.append(int(mean[start:start + len(g)].argmax()))
            start += len(g)
        return picks

    # ------------------------------------------------------------------ observe
    def observe(self, labelled: list[Candidate]) -> dict[str, float]:
        """Train the ensemble on the oracle's labels (ties and unjudged pairs carry none; model labels never)."""
        chosen, rejected, correct, margins, stds, num_queried, num_tied = [], [], [], [], [], 0, 0
        for c in labelled:
            entry = self.pending.pop(id(c), None)
            if c.labelled_by != "oracle" or entry is None:
                continue
            num_queried += 1
            phi_a, phi_b, margin, std = entry
            margins.append(abs(margin))
            stds.append(std)
            if c.probability is None or c.probability == 0.5:
                num_tied += c.probability is not None
                continue
            a_wins = c.probability > 0.5
            chosen.append(phi_a if a_wins else phi_b)
            rejected.append(phi_b if a_wins else phi_a)
            correct.append((margin > 0) == a_wins)  # the ensemble's prediction before it sees this label
        self.pending.clear()
        metrics = dict(self.metrics)
        metrics.update({
            "sea/rm_accuracy": sum(correct) / len(correct) if correct else float("nan"),
            "sea/pair_margin": _mean(margins), "sea/pair_uncertainty": _mean(stds),
            "sea/tie_fraction": num_tied / num_queried if num_queried else float("nan"),
        })
        if self.reward_model is not None:
            if chosen:
                self.reward_model.add(torch.stack(chosen), torch.stack(rejected), num_queries=num_queried)
            else:
                self.reward_model.num_queries += num_queried
            metrics.update(self.reward_model.train())
            metrics["sea/buffer_pairs"] = float(len(self.reward_model.buffer))
        if self.shadow_agreement is not None:
            metrics["sea/shadow_agreement"] = self.shadow_agreement
            self.shadow_agreement = None
        return metrics


class SEAExploreExploit(SEASelector):
    """Thompson sampling for explore-exploit: the best response of two different posterior samples."""

    name: ClassVar[str] = "sea-ee"

    def pick(self, rewards: Tensor) -> tuple[int, int]:
        order = torch.randperm(rewards.shape[0], generator=self.generator).tolist()
        first = int(rewards[order[0]].argmax())
        for member in order[1:]:
            second = int(rewards[member].argmax())
            if second != first:
                return first, second
        return first, first


class SEABestArm(SEASelector):
    """Best-arm identification: a posterior sample's best, against the response most uncertain relative to it."""

    name: ClassVar[str] = "sea-bai"

    def pick(self, rewards: Tensor) -> tuple[int, int]:
        first = int(rewards[self.rng.randrange(rewards.shape[0])].argmax())
        variance = (rewards[:, first:first + 1] - rewards).var(0)  # [n]; 0 at `first` itself
        variance[first] = -1.0
        return first, int(variance.argmax())


class SEAUncertainty(SEASelector):
    """The pair whose reward difference the ensemble members disagree on most."""

    name: ClassVar[str] = "sea-uncertainty"

    def pick(self, rewards: Tensor) -> tuple[int, int]:
        variance = (rewards[:, :, None] - rewards[:, None, :]).var(0)  # [n, n], symmetric, 0 on the diagonal
        variance.fill_diagonal_(-1.0)
        flat = int(variance.argmax())
        return flat // rewards.shape[1], flat % rewards.shape[1]


class SEAPassive(SEASelector):
    """A random pair, with the reward model trained all the same (the control for the rules)."""

    name: ClassVar[str] = "sea-passive"

    def pick(self, rewards: Tensor) -> tuple[int, int]:
        first, second = self.rng.sample(range(rewards.shape[1]), 2)
        return first, second


class SEAGreedy(SEASelector):
    """The ensemble mean's best against its worst: exploiting the reward model with no posterior sampling."""

    name: ClassVar[str] = "sea-greedy"

    def pick(self, rewards: Tensor) -> tuple[int, int]:
        mean = rewards.mean(0)
        return int(mean.argmax()), int(mean.argmin())


def _most_confident(rewards: Tensor) -> tuple[int, int, float]:
    """The pair with the largest |ensemble-mean margin|, ordered higher first: (i, j, margin >= 0)."""
    mean = rewards.mean(0)  # [n]
    i, j = int(mean.argmax()), int(mean.argmin())
    return i, j, float(mean[i] - mean[j])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
