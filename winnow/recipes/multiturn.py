"""`winnow train ALGO --env SPEC`: the RL run on episodes of an environment (`winnow.loops.multiturn`).

The same run config as `winnow train ALGO` (`TrainConfig`: model, rollout, learner, engine, sync, logging,
checkpoints), with the `--env*` flags in place of `--data` and `--oracle`: the environment is the task and its
rewards are the feedback.
"""
from __future__ import annotations

import logging
from pathlib import Path

from winnow.envs import make_env_factory
from winnow.envs.python_tool import PythonToolConfig
from winnow.learner.critic import make_critic
from winnow.loops.base import Loop
from winnow.loops.episodes import EpisodeConfig, EpisodeRunner
from winnow.loops.multiturn import MultiTurnFamily
from winnow.recipes.base import build_actor, build_learner, check_batching, engine_copy, finish, open_run, run_loop
from winnow.recipes.resume import finish_atomically
from winnow.setup import load_policy, resolve_device, setup_process, start_compile_workers

log = logging.getLogger(__name__)


def check_unused(config) -> None:
    """The environment is the task and its rewards the feedback: data or oracle flags would be ignored."""
    default = type(config)(algo=config.algo)
    unused = [flag for flag, name in (("--data.*", "data"), ("--oracle.*", "oracle"))
              if getattr(config, name) != getattr(default, name)]
    if unused:
        raise ValueError(f"{' and '.join(unused)} set, but --env runs take their task and rewards from the "
                         f"environment: drop them, or drop --env to train on --data prompts")


def train_on_env(config) -> Path:
    """Run policy iteration on `config.env`'s episodes; returns the run directory."""
    check_batching(config, config.rollout.samples_per_iteration, "episode")
    check_unused(config)
    factory = make_env_factory(config.env, config.env_tools,
                               PythonToolConfig(config.env_tool_timeout_s, config.env_tool_memory_mb))
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    start_compile_workers(device, config.compiles)
    objective = config.algo
    policy, tokenizer = load_policy(config.model)
    budget = config.check_env_options(getattr(policy.config, "max_position_embeddings", None))
    if config.env_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--env-format chat needs a tokenizer with a chat template; this one has none: use "
                         "--env-format plain")
    engine_model = engine_copy(config, policy, device)
    critic = (make_critic(policy, config.learner, lr=objective.critic_lr, total_steps=config.total_steps,
                          device=device) if objective.needs_critic else None)
    learner = build_learner(policy, config, total_steps=config.total_steps, needs_reference=objective.needs_reference,
                            temperature=config.rollout.temperature, device=device)
    actor = build_actor(config, engine_model, tokenizer, learner.device)
    run_dir = open_run(config, objective.name, learner.is_main)
    episode_config = EpisodeConfig(max_turns=config.env_max_turns, max_tokens=budget, format=config.env_format,
                                   num_workers=config.env_workers, step_timeout_s=config.env_step_timeout_s,
                                   success_reward=config.env_success_reward)
    runner = EpisodeRunner(factory, actor, tokenizer, episode_config)
    log.info("run %s: env %s, %d seeds x %d episodes per iteration, at most %d turns and %d tokens per episode",
             run_dir, config.env, config.rollout.prompts_per_iteration, config.rollout.num_samples,
             config.env_max_turns, budget)

    def make_loop(logger, bar) -> Loop:
        family = MultiTurnFamily(actor=actor, learner=learner, objective=objective, rollout=config.rollout,
                                 runner=runner, num_eval_episodes=config.env_eval_episodes, seed=config.seed,
                                 pad_token_id=tokenizer.pad_token_id, truncated=config.env_truncated, critic=critic)
        return Loop(family, learner=learner, actor=actor, num_iterations=config.num_iterations,
                    eval_every=config.eval.every, sync=config.sync, probe=[], seed=config.seed, logger=logger,
                    run_dir=run_dir, progress=bar, max_idle_iterations=config.rollout.max_idle_iterations)

    try:
        run_loop(config, run_dir, learner, make_loop, total=config.num_iterations, desc=f"{objective.name} {config.env}",
                 critic=critic)
    finally:
        runner.close()
    if config.save_final and critic is not None:
        finish_atomically(run_dir / "critic", critic.save, critic.model)
    return finish(config, run_dir, learner, tokenizer)
