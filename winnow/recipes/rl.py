"""`winnow train grpo|dr-grpo|rloo|ppo` (and any objective in `OBJECTIVES`): the RL run's config and its wiring."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from winnow import compile_ahead
from winnow.data import batches
from winnow.envs.config import EnvOptions
from winnow.lazy import lazy_function
from winnow.loops.base import Loop, PhaseTimer
from winnow.loops.config import EvalConfig
from winnow.loops.rl import RLFamily
from winnow.oracles import OracleConfig, RuleOracleConfig, check_oracle_config, make_oracle
from winnow.recipes.base import (
    OnlineRunConfig,
    build_actor,
    build_learner,
    check_answers,
    check_batching,
    engine_copy,
    finish,
    load_splits,
    log_startup,
    open_run,
    run_loop,
)
from winnow.recipes.resume import finish_atomically
from winnow.setup import load_policy, resolve_device, setup_process, start_compile_workers

make_critic = lazy_function("winnow.learner.critic", "make_critic")  # its module defines a torch.nn.Module

log = logging.getLogger(__name__)
AlgoT = TypeVar("AlgoT")


@dataclass(kw_only=True)
class TrainConfig(OnlineRunConfig, EnvOptions, Generic[AlgoT]):
    """A policy-iteration run: `winnow train ALGO` (on `--data` prompts, or on `--env` episodes)."""

    algo: AlgoT
    """the objective: advantages and loss"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    gold_rewards: list[str] = field(default_factory=list)
    """the task's true reward when the oracle is a proxy (a reward model): reward functions as --oracle.rule.rewards
    names them, scoring every sample beside the oracle (logged as gold/NAME with gold/oracle_pair_accuracy, never
    trained on) and judging held-out accuracy in its place (the first is the verifier); empty: none"""


def train(config: TrainConfig) -> Path:
    """Run policy iteration as `config` says; returns the run directory (metrics, plots, final model)."""
    if config.rollout.temperature <= 0:
        raise ValueError("--rollout.temperature must be > 0: RL needs sampled responses (greedy is for eval)")
    if config.algo.uses_group_baseline and config.rollout.num_samples < 2:
        raise ValueError(f"--rollout.num-samples {config.rollout.num_samples} with {config.algo.name}, whose "
                         f"baseline is the group's mean: every advantage would be 0 and nothing would train; "
                         f"use --rollout.num-samples 2 or more (or `winnow train ppo`, whose critic is the baseline)")
    if config.gold_rewards and (config.env is not None or config.runtime == "ray"):
        raise ValueError("--gold-rewards scores prompt datasets in the local runtime only: drop it, or use --data "
                         "with --runtime local")
    if config.env is not None:
        if config.runtime == "ray":
            raise ValueError("--env runs multi-turn episodes in the local runtime only: use --runtime local")
        from winnow.recipes.multiturn import train_on_env
        return train_on_env(config)
    check_batching(config, config.rollout.samples_per_iteration, "sample")
    check_oracle_config(config.oracle, default=type(config)(algo=config.algo).oracle, needs="reward")
    if config.runtime == "ray":
        from winnow.recipes.on_ray import train_on_ray

        return train_on_ray(config, config.algo)
    return _train_local(config)


def _train_local(config: TrainConfig) -> Path:
    """The local runtime: build the parts (timed, one start-up log line), run the loop, save."""
    compile_ahead.start(config)  # helpers compile the first iteration's graphs while this process imports and loads
    try:
        setup_process(config.seed, config.num_threads)
        device = resolve_device(config.device)
        start_compile_workers(device, config.compiles)
        return _train_local_parts(config, device)
    finally:
        compile_ahead.stop()


def _train_local_parts(config: TrainConfig, device) -> Path:
    objective = config.algo
    startup = PhaseTimer()
    with startup("load"):
        policy, tokenizer = load_policy(config.model)
    with startup("data and oracle"):
        train_prompts, eval_prompts = load_splits(config, tokenizer, config.eval.max_prompts)
        oracle, gold = _make_oracles(config, train_prompts, eval_prompts)
    try:
        actor, learner, critic = build_parts(config, policy, tokenizer, device, startup)
        log_startup(startup)
        run_dir = open_run(config, objective.name, learner.is_main)
        compile_ahead.keep_logs(run_dir)
        log.info("run %s: %d train / %d eval prompts, %d samples per iteration, %d optimizer steps per iteration",
                 run_dir, len(train_prompts), len(eval_prompts), config.rollout.samples_per_iteration,
                 config.learner.num_mini_batches * config.learner.num_epochs)

        def make_loop(logger, bar) -> Loop:
            return make_rl_loop(config, actor, learner, critic, oracle, gold, tokenizer, train_prompts, eval_prompts,
                                run_dir=run_dir, logger=logger, bar=bar)

        run_loop(config, run_dir, learner, make_loop, total=config.num_iterations, desc=objective.name,
                 critic=critic)
    finally:  # the oracles' worker processes end whether building the parts or the loop failed
        close_all(oracle, gold)
    if config.save_final and critic is not None:
        finish_atomically(run_dir / "critic", critic.save, critic.model)
    return finish(config, run_dir, learner, tokenizer)


def make_rl_loop(config: TrainConfig, actor, learner, critic, oracle, gold, tokenizer, train_prompts, eval_prompts, *,
                 run_dir: Path, logger, bar) -> Loop:
    """The RL run's loop over its built parts (also what `winnow.compile_ahead` replays on a one-layer policy)."""
    objective = config.algo
    family = RLFamily(
        actor=actor, learner=learner, oracle=oracle, objective=objective, rollout=config.rollout,
        eval_config=config.eval, prompts=batches(train_prompts, config.rollout.prompts_per_iteration, seed=config.seed),
        eval_prompts=eval_prompts if learner.is_main else [], seed=config.seed,
        pad_token_id=tokenizer.pad_token_id, critic=critic, gold=gold)
    # Rank 0 alone evaluates; the sync check's probe is the held-out prompts, else the first training prompts.
    probe = [p.token_ids for p in (eval_prompts or train_prompts)]
    return Loop(family, learner=learner, actor=actor, num_iterations=config.num_iterations,
                eval_every=config.eval.every, sync=config.sync, probe=probe, seed=config.seed, logger=logger,
                run_dir=run_dir, progress=bar, max_idle_iterations=config.rollout.max_idle_iterations)


def _make_oracles(config: TrainConfig, train_prompts, eval_prompts):
    """The run's oracle and, with --gold-rewards, the gold verifier (else None), each checked against the prompts'
    reference answers; both closed again if a check fails."""
    oracle, gold = make_oracle(config.oracle, needs="reward"), None
    try:
        if config.gold_rewards:
            gold = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=config.gold_rewards)))
        for judge in (oracle, gold):
            if judge is not None:
                check_answers(judge, train_prompts, config.data.train)
                check_answers(judge, eval_prompts, config.data.eval or config.data.train)
    except ValueError:
        close_all(oracle, gold)
        raise
    return oracle, gold


def build_parts(config: TrainConfig, policy, tokenizer, device, startup: PhaseTimer):
    """The actor (on the engine's own copy of the policy), the learner and PPO's critic (None for the other
    objectives), each part timed into `startup`."""
    objective = config.algo
    with startup("engine copy"):
        engine_model = engine_copy(config, policy, device)
    with startup("learner"):
        # PPO's value model: a copy of the policy's backbone, made before a sharded learner splits `policy` (and
        # before LoRA wraps it: the critic trains in full).
        critic = (make_critic(policy, config.learner, lr=objective.critic_lr, total_steps=config.total_steps,
                              device=device) if objective.needs_critic else None)
        learner = build_learner(policy, config, total_steps=config.total_steps,
                                needs_reference=objective.needs_reference, temperature=config.rollout.temperature,
                                device=device)
    with startup("engine"):
        actor = build_actor(config, engine_model, tokenizer, learner.device)
    return actor, learner, critic


def close_all(*oracles) -> None:
    """Close each oracle that was made (None: not made)."""
    for oracle in oracles:
        if oracle is not None:
            oracle.close()
