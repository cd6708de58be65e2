"""The RL family (GRPO, Dr. GRPO, RLOO, PPO, and any `PolicyObjective`): generate → score → advantages, then
the objective's loss over the iteration's samples.

Under torchrun with a sharded learner every rank runs this same family with its own engine: the same seeded
prompts and sampling, so every rank draws the same samples (on GPU they may differ in the last bits; each
rank's batch is still on-policy, since all engines hold the same synced weights). The learner trains each
rank on its shard of the batch with the global normalisers. Generation is repeated on every rank rather than
split: that costs generation time, not correctness; splitting it belongs to a distributed runtime.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

from winnow.lazy import lazy_import
from winnow.algorithms.objectives import PolicyObjective
from winnow.eval.accuracy import EvalResult, evaluate_accuracy
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import ForwardAhead, Learner
from winnow.loops.base import Counters, PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.config import EvalConfig, RolloutConfig
from winnow.loops.seam import Actor
from winnow.oracles.base import RewardOracle
from winnow.types import Completion, Group, Prompt, TrainBatch

torch = lazy_import("torch")


@dataclass
class RolloutCounters(Counters):
    """Counters of families that sample: prompts, samples, tokens and oracle queries so far."""

    prompts: int = 0
    samples: int = 0
    generated_tokens: int = 0
    oracle_queries: int = 0
    unscored_samples: int = 0


def iteration_seed(run_seed: int, iteration: int) -> int:
    """The sampling seed of one policy iteration: runs replay exactly, iterations differ."""
    return run_seed * 1_000_003 + iteration


class RLFamily:
    """Policy-gradient RL with a reward oracle.

    With an objective that `needs_critic` (PPO), `critic` is its value model: the advantages phase values the
    batch with it, and each policy step is followed by a critic step on the same mini-batch.

    `gold`, when given, is the task's true reward beside a proxy `oracle` (a reward model): it scores every
    sample too, logged as `gold/...` and never trained on, and it judges held-out accuracy in the oracle's place.
    That is how a run sees whether raising the proxy raises the truth (reward over-optimisation)."""

    def __init__(self, *, actor: Actor, learner: Learner, oracle: RewardOracle, objective: PolicyObjective,
                 rollout: RolloutConfig, eval_config: EvalConfig, prompts: Iterator[list[Prompt]],
                 eval_prompts: list[Prompt], seed: int, pad_token_id: int, critic: Learner | None = None,
                 gold: RewardOracle | None = None):
        if objective.needs_critic and critic is None:
            raise ValueError(f"{objective.name} trains a critic: build one (winnow.learner.critic.make_critic)")
        self.actor, self.learner, self.oracle, self.objective = actor, learner, oracle, objective
        self.gold = gold
        self.rollout, self.eval_config, self.prompts, self.eval_prompts = rollout, eval_config, prompts, eval_prompts
        self.seed, self.pad_token_id, self.critic = seed, pad_token_id, critic
        self.counters = RolloutCounters()
        self.idle_reason = ""
        """why the last collected batch carries no reward signal ("" when it does); the loop stops a run that
        stays idle for `rollout.max_idle_iterations` iterations"""
        self.ahead: ForwardAhead | None = None
        """the learner's forward of the collected batch's first micro-batch, run while scoring (`forward_ahead`)"""

    # ------------------------------------------------------------------ the family's phases

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        prompts = next(self.prompts)
        with timer("generate"):
            params = self.rollout.sampling_params(seed=iteration_seed(self.seed, iteration))
            completions = self.actor.generate([p.token_ids for p in prompts], params)
        with timer("score"):
            every_sample = self.forward_ahead(prompts, completions)
            groups, metrics = self.score(prompts, completions)
        with timer("advantages"):
            batch, advantage_metrics = self.advantages(groups, every_sample)
        return batch, {**metrics, **advantage_metrics}

    def train(self, batch: TrainBatch) -> dict[str, float]:
        loss_fn = partial(self.objective.loss, max_tokens=self.rollout.max_tokens)
        on_mini_batch = self.train_critic if self.objective.needs_critic else None
        ahead, self.ahead = self.ahead, None
        metrics = self.learner.train_policy(self.learner.shard(batch), loss_fn, self.objective.needs_reference,
                                            on_mini_batch=on_mini_batch, ahead=ahead)
        return metrics if ahead is None else {**metrics, "forward_while_scoring": 1.0}

    def evaluate(self) -> EvalResult:
        if not self.eval_prompts:
            return EvalResult({}, [])
        cfg = self.eval_config
        return evaluate_accuracy(
            self.actor, self.gold or self.oracle, self.eval_prompts,
            max_tokens=cfg.max_tokens or self.rollout.max_tokens,
            greedy=cfg.greedy, k=cfg.k, temperature=cfg.temperature, correct_threshold=cfg.correct_threshold,
            seed=self.seed, stop=list(self.rollout.stop),
        )

    def state_dict(self) -> dict:
        return {"counters": counters_state(self.counters), "prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.prompts.load_state_dict(state["prompts"])

    # ------------------------------------------------------------------ steps of collect

    def forward_ahead(self, prompts: list[Prompt], completions: list[Completion]) -> TrainBatch | None:
        """Before scoring: the batch of every sample (rewards to come), and the learner's forward of its first
        micro-batch launched on it, which the device runs while the host scores (`LearnerConfig.forward_while_
        scoring`). The actor sleeps first, freeing its memory for that forward (scoring does not use it).
        `advantages` trains this batch if scoring keeps every sample; else the forward is thrown away.
        None (and nothing run) for objectives that value or compare the batch before the step (a critic, a
        reference), and where groups are dropped by their rewards (`--rollout.drop-uniform-groups`)."""
        self.ahead = None
        objective = self.objective
        if (objective.needs_critic or objective.needs_reference
                or (self.rollout.drop_uniform_groups and objective.uses_group_baseline) or not completions):
            return None
        group_index = torch.arange(len(completions)) // (len(completions) // len(prompts))  # [B], as `score` groups
        batch = make_train_batch(completions, None, None, self.pad_token_id, group_index=group_index)
        self.actor.sleep()
        self.ahead = self.learner.forward_ahead(self.learner.shard(batch))
        return batch

    def score(self, prompts: list[Prompt], completions: list[Completion]) -> tuple[list[Group], dict[str, float]]:
        """Ask the oracle for every completion's reward; group them by prompt."""
        n = len(completions) // len(prompts)
        repeated = [p for p in prompts for _ in range(n)]
        columns = {key: [p.columns.get(key) for p in repeated] for key in prompts[0].columns}
        result = self.oracle.reward(
            [p.text for p in repeated], [c.text for c in completions], [p.reference for p in repeated], columns
        )
        groups = [Group(prompt, completions[i * n:(i + 1) * n], result.scores[i * n:(i + 1) * n],
                        {name: s[i * n:(i + 1) * n] for name, s in result.components.items()})
                  for i, prompt in enumerate(prompts)]
        c = self.counters
        c.prompts += len(prompts)
        c.samples += len(completions)
        c.oracle_queries += len(completions)
        c.generated_tokens += sum(x.num_tokens for x in completions)
        c.unscored_samples += result.num_failed
        scored = [s for s in result.scores if s is not None]
        lengths = [x.num_tokens for x in completions]
        metrics = {
            "reward/mean": _mean(scored),
            "reward/std": _std(scored),
            **{f"reward/{name}": _mean([s for s in v if s is not None]) for name, v in result.components.items()},
            "rollout/generated_tokens": float(sum(lengths)),
            "rollout/response_tokens_mean": _mean(lengths),
            "rollout/response_tokens_max": float(max(lengths)),
            "rollout/truncated_fraction": _mean([x.finish_reason == "length" for x in completions]),
            "oracle/unscored": float(result.num_failed),
            **result.metrics,
        }
        if self.gold is not None:
            metrics.update(self.gold_metrics(repeated, completions, columns, result.scores))
        return groups, metrics

    def gold_metrics(self, prompts: list[Prompt], completions: list[Completion], columns: dict[str, list[Any]],
                     scores: list[float | None]) -> dict[str, float]:
        """The gold oracle's reward of each sample, per function (`gold/<name>`), and how often the run's oracle
        orders two samples as the gold verifier (its first function) does (`gold/oracle_pair_accuracy`)."""
        gold = self.gold.reward([p.text for p in prompts], [c.text for c in completions],
                                [p.reference for p in prompts], columns)
        metrics = {f"gold/{name}": _mean([s for s in v if s is not None]) for name, v in gold.components.items()}
        verifier = next(iter(gold.components.values()), gold.scores)
        agreement = pair_agreement(scores, verifier)
        if agreement is not None:
            metrics["gold/oracle_pair_accuracy"] = agreement
        return metrics

    def advantages(self, groups: list[Group], every_sample: TrainBatch | None = None
                   ) -> tuple[TrainBatch | None, dict[str, float]]:
        """The batch of scored samples with the objective's advantages. Unscored samples leave their group
        (never trained on as a zero reward). With a group baseline a group needs two scored samples, else it
        is dropped (and with `drop_uniform_groups` a flat group too); without one every scored sample is kept.
        `every_sample`: the batch of all the groups' samples in order (`forward_ahead`), used when all are kept."""
        group_baseline = self.objective.uses_group_baseline
        completions, rewards, group_index = [], [], []
        num_uniform = num_small = num_dropped_uniform = 0
        for i, group in enumerate(groups):
            scored = [(c, r) for c, r in zip(group.completions, group.rewards) if r is not None]
            if len(scored) < (2 if group_baseline else 1):
                num_small += 1
                continue
            if all(r == scored[0][1] for _, r in scored):
                num_uniform += 1
                if self.rollout.drop_uniform_groups and group_baseline:
                    num_dropped_uniform += 1
                    continue
            completions.extend(c for c, _ in scored)
            rewards.extend(r for _, r in scored)
            group_index.extend([i] * len(scored))
        metrics = {"rollout/uniform_groups": float(num_uniform),
                   "rollout/dropped_groups": float(num_small + num_dropped_uniform),
                   "rollout/trained_samples": float(len(completions))}
        self.idle_reason = self._idle_reason(groups, num_small, num_uniform)
        if len(completions) < sum(len(g.completions) for g in groups):
            every_sample, self.ahead = None, None  # samples left: the forward run ahead was for other rows
        if not completions:
            return None, metrics
        reward_tensor = torch.tensor(rewards, dtype=torch.float32)  # [B]
        if not torch.isfinite(reward_tensor).all():
            worst = max(rewards, key=abs)
            raise ValueError(f"a reward of {worst!r} does not fit a float32 (|r| < 3.4e38): rewards must be finite "
                             f"numbers of a sane scale; fix the reward function or its weight (--oracle.rewards)")
        if every_sample is not None:
            batch, batch.rewards = every_sample, reward_tensor
        else:
            batch = make_train_batch(completions, None, reward_tensor, self.pad_token_id,
                                     group_index=torch.tensor(group_index))
        if self.objective.needs_critic:
            batch = self.value(batch)
        result = self.objective.advantages(batch)
        batch.advantages, batch.returns = result.values, result.returns
        return batch, {**metrics, **result.metrics}

    def _idle_reason(self, groups: list[Group], num_small: int, num_uniform: int) -> str:
        """Why this iteration's batch carries no reward signal ("" when it does): read by the loop's guard."""
        num_samples = sum(len(g.rewards) for g in groups)
        num_unscored = sum(r is None for g in groups for r in g.rewards)
        if num_unscored == num_samples:
            return ("every sample was unscored: the oracle could not score any response (see its errors above); "
                    "check --oracle.rewards and the answer column (--data.answer-column)")
        if num_small == len(groups):
            return ("no group kept two scored samples, which a group baseline needs: raise --rollout.num-samples "
                    "or fix what leaves samples unscored")
        if self.objective.uses_group_baseline and num_small + num_uniform == len(groups):
            return ("every group's rewards were equal, so every advantage is 0: the task is too hard or too easy "
                    "for the policy; raise --rollout.num-samples, use a denser reward, or warm-start the model")
        return ""

    def value(self, batch: TrainBatch) -> TrainBatch:
        """A critic objective's inputs: the critic's values, and the policy's (and reference's) logprobs taken
        before any update (they shape PPO's KL penalty in the reward and are the clipped ratio's pi_old)."""
        batch = batch.to(self.learner.device)
        batch.old_logprobs = self.learner.logprobs(self.learner.model, batch)  # [B, T]
        if self.objective.needs_reference:
            batch.ref_logprobs = self.learner.reference_logprobs(batch)  # [B, T]
        batch.old_values = self.critic.predict(batch)  # [B, T]
        return batch

    @property
    def train_critic(self) -> "CriticStep":
        """The critic's optimizer step on each policy step's mini-batch (`train_policy`'s `on_mini_batch`)."""
        return CriticStep(self.critic, self.objective.value_loss)


@dataclass(frozen=True)
class CriticStep:
    """One critic optimizer step on a mini-batch; its metrics as `critic/...`. A value rather than a bound
    method, so a distributed learner can rebuild it where its critic lives (`winnow.distributed`: a learner rank
    holds the critic beside the policy) with the same `value_loss`."""

    critic: Any
    """the critic's `Learner` (or a handle standing for the critics of remote learner ranks)"""
    value_loss: Callable
    """the objective's value loss"""

    def __call__(self, mini_batch: TrainBatch) -> dict[str, float]:
        metrics = self.critic.train_step(mini_batch, self.value_loss)
        return {f"critic/{key}": value for key, value in metrics.items()}


def pair_agreement(scores: list[float | None], truth: list[float | None]) -> float | None:
    """Over every pair of samples whose `truth` differs (both scored by both), the fraction that `scores` orders
    the same way, a tie counting half: 1 is perfect, 0.5 is chance (for a 0/1 truth, the AUC of `scores`).
    None when no pair differs in truth."""
    rows = [(t, s) for s, t in zip(scores, truth) if s is not None and t is not None]
    agree = num_pairs = 0.0
    lower: list[float] = []  # the sorted scores of the samples whose truth is below the current level
    for level in sorted({t for t, _ in rows}):
        level_scores = [s for t, s in rows if t == level]
        for s in level_scores:
            below, not_above = bisect.bisect_left(lower, s), bisect.bisect_right(lower, s)
            agree += below + 0.5 * (not_above - below)
            num_pairs += len(lower)
        lower = sorted(lower + level_scores)
    return agree / num_pairs if num_pairs else None


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _std(values) -> float:
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
