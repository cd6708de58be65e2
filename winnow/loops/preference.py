"""The online preference family (online DPO / IPO / SLiC / SimPO): generate → judge, then the pair loss.

This is online AI feedback (Guo et al. 2024, OAIF): the pair is sampled from the current policy and labelled
by the oracle now, so the data are always on-policy. Which pair of each prompt's responses is labelled is the
exploration method's choice (`winnow.exploration`: `select`, then `observe` the labels). The preference
probability p (a beats b) is used as a label: chosen = a when p > 0.5, b when p < 0.5; a tie (p exactly 0.5)
and a pair the oracle could not judge carry no label: both are counted and never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from winnow.eval.accuracy import EvalResult
from winnow.eval.win_rate import evaluate_best_of_n, evaluate_win_rate, reference_responses
from winnow.exploration.base import Judge, PairSelector, to_pairs
from winnow.learner.batch import make_pair_batch
from winnow.learner.learner import Learner
from winnow.loops.base import PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.config import RolloutConfig, WinRateConfig
from winnow.loops.rl import RolloutCounters, _mean, iteration_seed
from winnow.loops.seam import Actor
from winnow.oracles.base import PreferenceOracle
from winnow.types import Prompt, TrainBatch


@dataclass
class PreferenceCounters(RolloutCounters):
    """Rollout counters plus pairs: judged, trained, tied (no label), unjudged (the oracle failed), labelled by a
    reward model, and the oracle queries spent on evaluation and on shadow checks (kept apart from the training
    queries, `oracle_queries`: one per compared pair, one per scored response)."""

    pairs: int = 0
    trained_pairs: int = 0
    tied_pairs: int = 0
    unjudged_pairs: int = 0
    model_labelled_pairs: int = 0
    """pairs a reward model labelled instead of the oracle (SEA's mixed learning): trained on, never queried"""
    shadow_queries: int = 0
    """oracle comparisons of model-labelled pairs, only to measure agreement (never trained on)"""
    eval_oracle_queries: int = 0


class PreferenceFamily:
    """Online preference optimisation with a pair selector and a preference oracle."""

    def __init__(self, *, actor: Actor, learner: Learner, oracle: PreferenceOracle, objective,
                 selector: PairSelector, rollout: RolloutConfig, eval_config: WinRateConfig,
                 prompts: Iterator[list[Prompt]], eval_prompts: list[Prompt], seed: int, pad_token_id: int):
        self.actor, self.learner, self.oracle, self.objective = actor, learner, oracle, objective
        self.selector, self.rollout, self.eval_config = selector, rollout, eval_config
        self.prompts, self.eval_prompts, self.seed, self.pad_token_id = prompts, eval_prompts, seed, pad_token_id
        self.eval_references = reference_responses(eval_prompts, eval_config.reference_column)
        self.counters = PreferenceCounters()
        self.idle_reason = ""
        """why the last collected batch has no pair to train on ("" when it has); read by the loop's guard"""

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        prompts = next(self.prompts)
        with timer("generate"):
            params = self.rollout.sampling_params(seed=iteration_seed(self.seed, iteration))
            completions = self.actor.generate([p.token_ids for p in prompts], params)
        with timer("judge"):
            n = params.n
            groups = [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
            judge = Judge(self.oracle)
            candidates = self.selector.select(prompts, groups, judge)
            pairs, metrics = to_pairs(candidates)
            metrics.update(self.selector.observe(candidates))
        c = self.counters
        c.prompts += len(prompts)
        c.samples += len(completions)
        c.generated_tokens += sum(x.num_tokens for x in completions)
        c.oracle_queries += judge.num_queries
        c.pairs += len(candidates)
        c.trained_pairs += len(pairs)
        c.tied_pairs += int(metrics["pref/tied"])
        c.unjudged_pairs += int(metrics["pref/unjudged"])
        c.model_labelled_pairs += int(metrics["pref/model_labelled"])
        c.shadow_queries += judge.num_shadow_queries
        lengths = [x.num_tokens for x in completions]
        metrics.update({
            "rollout/generated_tokens": float(sum(lengths)), "rollout/response_tokens_mean": _mean(lengths),
            "rollout/truncated_fraction": _mean([x.finish_reason == "length" for x in completions]),
            **judge.metrics,
        })
        self.idle_reason = "" if pairs else (
            f"every pair was tied ({int(metrics['pref/tied'])}) or unjudged ({int(metrics['pref/unjudged'])}): the "
            f"oracle told no two responses apart; raise --rollout.num-samples or --rollout.temperature, or use an "
            f"oracle that separates them")
        return (make_pair_batch(pairs, self.pad_token_id) if pairs else None), metrics

    def train(self, batch: TrainBatch) -> dict[str, float]:
        return train_pairs(self.learner, batch, self.objective)

    def state_dict(self) -> dict:
        """Counters, the prompt stream's position and the selector's state (a selector without
        `state_dict` holds none)."""
        selector = self.selector.state_dict() if hasattr(self.selector, "state_dict") else None
        return {"counters": counters_state(self.counters), "prompts": self.prompts.state_dict(),
                "selector": selector}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.prompts.load_state_dict(state["prompts"])
        if state["selector"] is not None:
            self.selector.load_state_dict(state["selector"])

    def evaluate(self) -> EvalResult:
        if not self.eval_prompts:
            return EvalResult({}, [])
        cfg = self.eval_config
        result = evaluate_win_rate(self.actor, self.oracle, self.eval_prompts, self.eval_references,
                                   max_tokens=cfg.max_tokens or self.rollout.max_tokens, stop=list(self.rollout.stop))
        self.counters.eval_oracle_queries += len(self.eval_prompts)
        if cfg.best_of_n:  # the selector's reward model chooses among N samples (SEA's evaluation)
            best = evaluate_best_of_n(self.actor, self.oracle, self.eval_prompts, self.eval_references,
                                      pick=self.selector.best_of, n=cfg.best_of_n,
                                      max_tokens=cfg.max_tokens or self.rollout.max_tokens,
                                      temperature=self.rollout.temperature, seed=self.seed, stop=list(self.rollout.stop))
            result.metrics.update(best.metrics)
            self.counters.eval_oracle_queries += 2 * len(self.eval_prompts)
        return result


def train_pairs(learner: Learner, batch: TrainBatch, objective) -> dict[str, float]:
    """The iteration's optimizer steps on a pair batch (`make_pair_batch`): whole pairs, this rank's share."""
    return learner.train_policy(learner.shard(batch, rows_per_unit=2), objective.loss, objective.needs_reference,
                                rows_per_unit=2)
