"""`winnow train dpo|ipo|slic|simpo`: the preference run's config and its wiring.

Online (the default): the policy samples `rollout.num_samples` responses per prompt, the exploration method
picks a pair per prompt and the preference oracle labels it, the policy trains on it (`PreferenceFamily`).
Offline (`--offline`): the pairs come from a `{prompt, chosen, rejected}` dataset instead
(`OfflinePreferenceFamily`). Both log `counts/...` so curves can use oracle queries as the x axis.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from winnow.data import DataConfig, batches, load_prompts
from winnow.exploration import SELECTORS, make_selector
from winnow.exploration.features import make_featurizer
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import LearnerConfig
from winnow.loops.base import Loop
from winnow.loops.config import PairConfig, RolloutConfig, WinRateConfig
from winnow.loops.offline import OfflinePreferenceFamily, dataset_pairs
from winnow.loops.preference import PreferenceFamily
from winnow.oracles import OracleConfig, RuleOracleConfig, check_oracle_config, make_oracle
from winnow.recipes.base import (
    OnlineRunConfig,
    build_actor,
    build_learner,
    check_batching,
    engine_copy,
    finish,
    load_splits,
    open_run,
    run_loop,
)
from winnow.setup import load_policy, resolve_device, setup_process, start_compile_workers

log = logging.getLogger(__name__)
AlgoT = TypeVar("AlgoT")

PairSelection = str
"""a name in `winnow.exploration.SELECTORS` (kept for imports of the old name)"""


@dataclass(kw_only=True)
class PreferenceTrainConfig(OnlineRunConfig, Generic[AlgoT]):
    """A preference-optimisation run: `winnow train dpo|ipo|slic|simpo`."""

    algo: AlgoT
    """the preference objective: DPO, IPO, SLiC or SimPO"""
    data: DataConfig = field(default_factory=lambda: DataConfig(train="arithmetic-pref"))
    oracle: OracleConfig = field(default_factory=lambda: OracleConfig(rule=RuleOracleConfig(rewards=["closeness"])))
    """judges preferences (`--oracle.kind rule|remote|reward_model|judge`) and the win rate"""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_samples=8))
    """sampling of the online loop: num_samples >= 2 responses per prompt"""
    pairs: PairConfig = field(default_factory=PairConfig)
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=5e-6))
    eval: WinRateConfig = field(default_factory=WinRateConfig)
    offline: bool = False
    """train on a fixed {prompt, chosen, rejected} dataset (--data.train pairs.jsonl) instead of online samples"""
    num_iterations: int = 100
    """policy iterations (online) or batches of rollout.prompts_per_iteration pairs (offline)"""

    def __post_init__(self) -> None:
        problems = []
        if not self.offline and self.rollout.num_samples < 2:
            problems.append(f"--rollout.num-samples {self.rollout.num_samples}: a pair needs at least 2 responses")
        if not self.offline and self.rollout.temperature <= 0:
            problems.append("rollout.temperature must be > 0: greedy decoding gives one response, not a pair")
        if self.learner.micro_batch_size % 2 and not self.learner.micro_batch_tokens:  # a token budget keeps pairs
            problems.append(f"learner.micro_batch_size={self.learner.micro_batch_size} must be even (whole pairs)")
        if self.pairs.selection not in SELECTORS:
            problems.append(f"pairs.selection={self.pairs.selection!r} must be one of {', '.join(SELECTORS)}")
        own = getattr(self.algo, "pair_selection", None)  # an objective that only works with its own pairs (xpo)
        if own and self.pairs.selection == PairConfig.selection:
            self.pairs.selection = own  # the shared default (best_vs_worst) cannot serve it: use its pairs
        elif own and self.pairs.selection != own and not self.offline:
            problems.append(f"winnow train {self.algo.name} needs --pairs.selection {own}, not {self.pairs.selection}")
        if self.pairs.selection.startswith("apl") and not getattr(self.algo, "needs_reference", False):
            problems.append(f"--pairs.selection {self.pairs.selection} needs a reference policy: use dpo, ipo or slic")
        if self.eval.best_of_n and (self.eval.best_of_n < 2 or not self.pairs.selection.startswith("sea")):
            problems.append(f"--eval.best-of-n {self.eval.best_of_n}: best-of-N evaluation chooses with SEA's reward "
                            f"model among >= 2 samples: give n >= 2 and --pairs.selection sea-ee, sea-bai, "
                            f"sea-uncertainty, sea-passive or sea-greedy (0 turns it off)")
        if problems:
            raise ValueError("invalid preference config: " + "; ".join(problems))


def train_preference(config: PreferenceTrainConfig) -> Path:
    """Run online (or, with `config.offline`, offline) preference optimisation; returns the run directory."""
    if config.runtime == "ray":
        from winnow.recipes.on_ray import train_preference_on_ray

        return train_preference_on_ray(config, _oracle_needs(config))
    if not config.offline:
        check_oracle_config(config.oracle, default=type(config)(algo=config.algo).oracle, needs=_oracle_needs(config))
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    start_compile_workers(device, config.compiles)
    policy, tokenizer = load_policy(config.model)
    if config.offline:
        return _train_offline(config, policy, tokenizer, device)
    check_batching(config, config.rollout.prompts_per_iteration, "pair")
    train_prompts, eval_prompts = load_splits(config, tokenizer, config.eval.max_prompts)
    needs_frozen = config.pairs.selection == "xpo" or (config.pairs.selection.startswith("sea")
                                                       and config.pairs.sea.features == "policy")
    frozen = copy.deepcopy(policy) if needs_frozen else None
    oracle = make_oracle(config.oracle, needs=_oracle_needs(config))
    engine_model = engine_copy(config, policy, device)
    learner = build_learner(policy, config, total_steps=config.total_steps, needs_reference=config.algo.needs_reference,
                            temperature=config.rollout.temperature, device=device)
    actor = build_actor(config, engine_model, tokenizer, learner.device)
    run_dir = open_run(config, config.algo.name, learner.is_main)
    log.info("run %s: %d train / %d eval prompts, %d prompts x %d samples per iteration, pairs by %s",
             run_dir, len(train_prompts), len(eval_prompts), config.rollout.prompts_per_iteration,
             config.rollout.num_samples, config.pairs.selection)
    probe = [p.token_ids for p in (eval_prompts or train_prompts)]
    selector = make_selector(config.pairs.selection, seed=config.seed,
                             **selector_context(config, learner, tokenizer, frozen))

    def make_loop(logger, bar) -> Loop:
        family = PreferenceFamily(
            actor=actor, learner=learner, oracle=oracle, objective=config.algo, selector=selector,
            rollout=config.rollout, eval_config=config.eval,
            prompts=batches(train_prompts, config.rollout.prompts_per_iteration, seed=config.seed),
            eval_prompts=eval_prompts if learner.is_main else [], seed=config.seed,
            pad_token_id=tokenizer.pad_token_id)
        return Loop(family, learner=learner, actor=actor, num_iterations=config.num_iterations,
                    eval_every=config.eval.every, sync=config.sync, probe=probe, seed=config.seed, logger=logger,
                    run_dir=run_dir, progress=bar, max_idle_iterations=config.rollout.max_idle_iterations)

    try:
        run_loop(config, run_dir, learner, make_loop, total=config.num_iterations, desc=config.algo.name)
    finally:
        oracle.close()
    return finish(config, run_dir, learner, tokenizer)


def _oracle_needs(config: PreferenceTrainConfig):
    """What the oracle must do: compare pairs, and score responses too for a selector that reads scores."""
    return ("reward", "compare") if SELECTORS[config.pairs.selection].needs_rewards else "compare"


def selector_context(config: PreferenceTrainConfig, learner, tokenizer, frozen) -> dict[str, Any]:
    """What the exploration methods may need, built only for the one chosen: SEA's config and features, APL's
    reference log-probabilities, XPO's reference engine (`frozen`: a copy of the initial policy)."""
    name = config.pairs.selection
    context: dict[str, Any] = {}
    if name.startswith("sea"):
        device = str(learner.device)
        context["config"] = config.pairs.sea
        context["featurize"] = make_featurizer(config.pairs.sea.features, policy=None if frozen is None else frozen.to(device),
                                               device=device)
    if name.startswith("apl"):
        context["config"] = config.pairs.apl

        def reference_logprobs(completions):
            batch = make_train_batch(completions, pad_token_id=tokenizer.pad_token_id).to(learner.device)
            return (learner.reference_logprobs(batch) * batch.response_mask).sum(-1).tolist()

        context["reference_logprobs"] = reference_logprobs
    if name == "xpo":
        # A second engine on the frozen initial policy, never synced: one more model copy in memory, one more
        # sample per prompt each iteration (vLLM loads --model.path, the same initial weights, a second time).
        reference = build_actor(config, engine_copy(config, frozen), tokenizer, learner.device)
        def reference_generate(prompts, call: int):
            params = dataclasses.replace(config.rollout.sampling_params(seed=config.seed + 7919 * call), n=1)
            completions = reference.generate([p.token_ids for p in prompts], params)
            return [dataclasses.replace(c, sampled_by="reference") for c in completions]

        context["reference_generate"] = reference_generate
    return context


def _train_offline(config: PreferenceTrainConfig, policy, tokenizer, device) -> Path:
    """Offline preference optimisation on dataset pairs (the learner's temperature is 1: nothing was sampled)."""
    learner = build_learner(policy, config, total_steps=config.total_steps, needs_reference=config.algo.needs_reference,
                            temperature=1.0, device=device)
    data = dataclasses.replace(config.data, answer_column=None)  # the labels are chosen/rejected, not an answer
    train = dataset_pairs(load_prompts(data, tokenizer, "train"), tokenizer, data.train)
    held_out = dataset_pairs(load_prompts(data, tokenizer, "eval"), tokenizer, data.eval or data.train)
    run_dir = open_run(config, config.algo.name, learner.is_main)

    def make_loop(logger, bar) -> Loop:
        family = OfflinePreferenceFamily(
            learner=learner, objective=config.algo,
            pairs=batches(train, config.rollout.prompts_per_iteration, seed=config.seed),
            eval_pairs=held_out[: config.eval.max_prompts], pad_token_id=tokenizer.pad_token_id)
        return Loop(family, learner=learner, actor=None, num_iterations=config.num_iterations,
                    eval_every=config.eval.every, logger=logger, run_dir=run_dir, progress=bar)

    run_loop(config, run_dir, learner, make_loop, total=config.num_iterations, desc=config.algo.name)
    return finish(config, run_dir, learner, tokenizer)
