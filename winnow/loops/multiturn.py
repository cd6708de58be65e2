"""The multi-turn RL family: GRPO, Dr. GRPO, RLOO and PPO on whole episodes of an environment.

One iteration: `prompts_per_iteration` reset seeds, `num_samples` episodes each (copies reset with one seed
start alike: a group), run by `EpisodeRunner`; then

- each episode is one trajectory, one row of the batch, whose loss mask is the policy's tokens only (the
  environment's observations are context, never a target);
- the episode's return (the sum of its turn rewards) is the reward of its group: GRPO/Dr. GRPO/RLOO advantages
  are the returns' group-relative values, on every policy token of the episode;
- PPO's critic values every policy token; each turn's reward sits on that turn's last policy token
  (`TrainBatch.turn_rewards`) and GAE runs across turns over the policy's tokens, passing over the
  environment's tokens (they are holes in the mask, not steps);
- truncated episodes (cut by the environment's truncation, `--env-max-turns` or `--env-max-tokens`) are counted;
  `--env-truncated keep` (the default) trains on them with the return they reached, `drop` leaves them out of
  their group (they then do not count towards the group's baseline either);
- an episode whose environment raised or timed out is dropped and counted (`env/errors`).

A group needs two episodes left for a group baseline, else it is dropped (as in `RLFamily`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

from winnow.algorithms.objectives import PolicyObjective
from winnow.eval.accuracy import EvalResult
from winnow.learner.batch import make_episode_batch
from winnow.learner.learner import Learner
from winnow.loops.base import PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.config import RolloutConfig
from winnow.loops.episodes import EpisodeRunner, EpisodeStats
from winnow.loops.rl import RLFamily, RolloutCounters, _mean, iteration_seed
from winnow.lazy import lazy_import
from winnow.types import Episode, SamplingParams, TrainBatch

torch = lazy_import("torch")

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_000_007
"""held-out episodes reset with seeds from here on; training seeds stay below it"""


@dataclass
class EpisodeCounters(RolloutCounters):
    """Rollout counters, plus episodes and what happened to them."""

    episodes: int = 0
    turns: int = 0
    truncated_episodes: int = 0
    env_errors: int = 0


class MultiTurnFamily(RLFamily):
    """Policy-gradient RL on episodes of an environment (see the module docstring). Shares `RLFamily`'s critic
    steps (`value`, `train_critic`)."""

    def __init__(self, *, actor, learner: Learner, objective: PolicyObjective, rollout: RolloutConfig,
                 runner: EpisodeRunner, num_eval_episodes: int, seed: int, pad_token_id: int,
                 truncated: Literal["keep", "drop"] = "keep", critic: Learner | None = None):
        if objective.needs_critic and critic is None:
            raise ValueError(f"{objective.name} trains a critic: build one (winnow.learner.critic.make_critic)")
        self.actor, self.learner, self.objective, self.rollout, self.runner = actor, learner, objective, rollout, runner
        self.num_eval_episodes, self.seed, self.pad_token_id = num_eval_episodes, seed, pad_token_id
        self.truncated, self.critic = truncated, critic
        self.counters = EpisodeCounters()
        self.idle_reason = ""

    @property
    def max_policy_tokens(self) -> int:
        """An episode's most policy tokens: Dr. GRPO's constant normaliser (`max_tokens` per turn x turns)."""
        return self.rollout.max_tokens * self.runner.config.max_turns

    # ------------------------------------------------------------------ the family's phases

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        sample_seed = iteration_seed(self.seed, iteration)
        seeds = [(sample_seed * 4099 + i) % EVAL_SEED_OFFSET for i in range(self.rollout.prompts_per_iteration)]
        episodes, stats = self.runner.run(seeds, self.rollout.sampling_params(), sample_seed=sample_seed)
        timer.seconds["generate"] = stats.generate_seconds
        timer.seconds["env"] = stats.env_seconds
        metrics = self.count(episodes, stats)
        with timer("advantages"):
            batch, advantage_metrics = self.advantages_of(self.groups(episodes))
        return batch, {**metrics, **advantage_metrics}

    def train(self, batch: TrainBatch) -> dict[str, float]:
        loss_fn = partial(self.objective.loss, max_tokens=self.max_policy_tokens)
        on_mini_batch = self.train_critic if self.objective.needs_critic else None
        return self.learner.train_policy(self.learner.shard(batch), loss_fn, self.objective.needs_reference,
                                         on_mini_batch=on_mini_batch)

    def evaluate(self) -> EvalResult:
        """Greedy episodes from held-out seeds: success rate, return, turns."""
        if self.num_eval_episodes <= 0 or not self.learner.is_main:
            return EvalResult({}, [])
        seeds = [EVAL_SEED_OFFSET + i for i in range(self.num_eval_episodes)]
        params = SamplingParams(temperature=0.0, max_tokens=self.rollout.max_tokens, stop=list(self.rollout.stop))
        episodes, stats = self.runner.run(seeds, params, sample_seed=self.seed)
        done = [e for e in episodes if e is not None]
        metrics = {"eval/success_rate": _mean([e.is_success for e in done]),
                   "eval/return": _mean([e.episode_return for e in done]),
                   "eval/turns_per_episode": _mean([e.num_turns for e in done]),
                   "eval/truncated_fraction": _mean([e.truncated for e in done]),
                   "eval/env_errors": float(stats.num_errors)}
        samples = [{"seed": e.seed, "observations": e.observations, "actions": e.actions,
                    "rewards": e.turn_rewards, "success": e.is_success} for e in done[:8]]
        return EvalResult(metrics, samples)

    def state_dict(self) -> dict:
        return {"counters": counters_state(self.counters)}  # seeds follow from the iteration: no stream to save

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])

    # ------------------------------------------------------------------ steps of collect

    def count(self, episodes: list[Episode | None], stats: EpisodeStats) -> dict[str, float]:
        """The iteration's episode numbers (logged), and the running counters."""
        done = [e for e in episodes if e is not None]
        if stats.errors:
            log.warning("%d episodes dropped for environment errors, e.g. %s", stats.num_errors, stats.errors[0])
        c = self.counters
        c.prompts += self.rollout.prompts_per_iteration
        c.episodes += len(done)
        c.samples += len(done)
        c.turns += sum(e.num_turns for e in done)
        c.generated_tokens += sum(e.num_policy_tokens for e in done)
        c.truncated_episodes += sum(e.truncated for e in done)
        c.env_errors += stats.num_errors
        turns = sum(e.num_turns for e in done)
        return {
            "reward/mean": _mean([e.episode_return for e in done]),
            "episode/success_rate": _mean([e.is_success for e in done]),
            "episode/return": _mean([e.episode_return for e in done]),
            "episode/turns": _mean([e.num_turns for e in done]),
            "episode/tokens_per_turn": sum(e.num_policy_tokens for e in done) / turns if turns else float("nan"),
            "episode/truncated_fraction": _mean([e.truncated for e in done]),
            "env/errors": float(stats.num_errors),
            "env/seconds": stats.env_seconds,
            "rollout/generated_tokens": float(sum(e.num_policy_tokens for e in done)),
            "rollout/prefill_tokens": float(stats.prefill_tokens),
        }

    def groups(self, episodes: list[Episode | None]) -> list[list[Episode]]:
        """Episodes grouped by reset seed, without dropped ones (and without truncated ones under `drop`)."""
        by_seed: dict[int, list[Episode]] = {}
        for e in episodes:
            if e is not None and not (e.truncated and self.truncated == "drop"):
                by_seed.setdefault(e.seed, []).append(e)
        return list(by_seed.values())

    def advantages_of(self, groups: list[list[Episode]]) -> tuple[TrainBatch | None, dict[str, float]]:
        """The batch of episodes with the objective's advantages; groups too small for a group baseline drop."""
        needs = 2 if self.objective.uses_group_baseline else 1
        kept = [g for g in groups if len(g) >= needs]
        num_uniform = sum(all(e.episode_return == g[0].episode_return for e in g) for g in kept)
        metrics = {"rollout/dropped_groups": float(len(groups) - len(kept)),
                   "rollout/uniform_groups": float(num_uniform),
                   "rollout/trained_samples": float(sum(len(g) for g in kept))}
        self.idle_reason = self._episode_idle_reason(kept, num_uniform)
        if not kept:
            return None, metrics
        episodes = [e for g in kept for e in g]
        group_index = torch.tensor([i for i, g in enumerate(kept) for _ in g])
        batch = make_episode_batch(episodes, self.pad_token_id, group_index=group_index)
        if self.objective.needs_critic:
            batch = self.value(batch)
        result = self.objective.advantages(batch)
        batch.advantages, batch.returns = result.values, result.returns
        return batch, {**metrics, **result.metrics}

    def _episode_idle_reason(self, kept: list[list[Episode]], num_uniform: int) -> str:
        if not kept:
            return ("no group kept enough episodes (environment errors, or truncated episodes with --env-truncated "
                    "drop): see env/errors and episode/truncated_fraction")
        if self.objective.uses_group_baseline and num_uniform == len(kept):
            return ("every group's episode returns were equal, so every advantage is 0: the environment is too hard "
                    "or too easy for the policy; raise --rollout.num-samples or warm-start the model")
        return ""
