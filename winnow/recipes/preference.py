"""`winnow train dpo|ipo|slic|simpo`: the preference run's config and its wiring.

Online (the default): the policy samples `rollout.num_samples` responses per prompt, the exploration method
picks a pair per prompt and the preference oracle labels it, the policy trains on it (`PreferenceFamily`).
Offline (`--offline`): the pairs come from a `{prompt, chosen, rejected}` dataset instead
(`OfflinePreferenceFamily`). Both log `counts/...` so curves can use oracle queries as the x axis.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from winnow.data import DataConfig, batches, load_prompts
from winnow.exploration import SELECTORS, make_selector
from winnow.learner.learner import LearnerConfig
from winnow.loops.base import Loop
from winnow.loops.config import PairConfig, RolloutConfig, WinRateConfig
from winnow.loops.offline import OfflinePreferenceFamily, dataset_pairs
from winnow.loops.preference import PreferenceFamily
from winnow.oracles import OracleConfig, make_preference_oracle
from winnow.oracles.base import RewardOracle
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
from winnow.setup import load_policy, resolve_device, setup_process

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
    oracle: OracleConfig = field(default_factory=lambda: OracleConfig(rewards=["closeness"]))
    """judges preferences (`--oracle.kind rule|reward_model|judge`) and the win rate"""
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
        if self.learner.micro_batch_size % 2:
            problems.append(f"learner.micro_batch_size={self.learner.micro_batch_size} must be even (whole pairs)")
        if self.pairs.selection not in SELECTORS:
            problems.append(f"pairs.selection={self.pairs.selection!r} must be one of {', '.join(SELECTORS)}")
        if problems:
            raise ValueError("invalid preference config: " + "; ".join(problems))


def train_preference(config: PreferenceTrainConfig) -> Path:
    """Run online (or, with `config.offline`, offline) preference optimisation; returns the run directory."""
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    policy, tokenizer = load_policy(config.model)
    if config.offline:
        return _train_offline(config, policy, tokenizer, device)
    check_batching(config, config.rollout.prompts_per_iteration, "pair")
    train_prompts, eval_prompts = load_splits(config, tokenizer, config.eval.max_prompts)
    selector = make_selector(config.pairs.selection, seed=config.seed)
    oracle = make_preference_oracle(config.oracle)
    if selector.needs_rewards and not isinstance(oracle, RewardOracle):
        oracle.close()
        raise ValueError(f"--pairs.selection {config.pairs.selection} needs scalar rewards, but oracle.kind="
                         f"{config.oracle.kind!r} only compares; use --pairs.selection random")
    engine_model = engine_copy(config, policy)
    learner = build_learner(policy, config, total_steps=config.total_steps, needs_reference=config.algo.needs_reference,
                            temperature=config.rollout.temperature, device=device)
    actor = build_actor(config, engine_model, tokenizer, learner.device)
    run_dir = open_run(config, config.algo.name, learner.is_main)
    log.info("run %s: %d train / %d eval prompts, %d prompts x %d samples per iteration, pairs by %s",
             run_dir, len(train_prompts), len(eval_prompts), config.rollout.prompts_per_iteration,
             config.rollout.num_samples, config.pairs.selection)
    probe = [p.token_ids for p in (eval_prompts or train_prompts)]

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
