"""`winnow train ALGO` for RL objectives: build the parts from a TrainConfig and run the local loop."""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from winnow.config import TrainConfig, save_config
from winnow.data import batches, load_prompts
from winnow.engines import make_engine
from winnow.learner.critic import make_critic
from winnow.learner.learner import Learner
from winnow.learner.lora import apply_lora
from winnow.logging import MetricsLogger, progress
from winnow.logging.plot import plot_run
from winnow.oracles import check_oracle_config, make_oracle
from winnow.runtime.local import LocalRuntime
from winnow.runtime.setup import load_policy, resolve_device, setup_process, shared_run_dir

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> Path:
    """Run policy iteration as `config` says; returns the run directory (metrics, plots, final model)."""
    if config.rollout.temperature <= 0:
        raise ValueError("rollout.temperature must be > 0: RL needs sampled responses (greedy is for eval)")
    check_oracle_config(config.oracle, default=type(config)(algo=config.algo).oracle, needs="reward")
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)

    policy, tokenizer = load_policy(config.model)
    train_prompts = load_prompts(config.data, tokenizer, "train")
    eval_prompts = load_prompts(config.data, tokenizer, "eval")
    if config.eval.max_prompts is not None:
        eval_prompts = eval_prompts[: config.eval.max_prompts]
    if len(train_prompts) < config.rollout.prompts_per_iteration:
        raise ValueError(
            f"{len(train_prompts)} training prompts but rollout.prompts_per_iteration="
            f"{config.rollout.prompts_per_iteration}; lower it or add data"
        )
    oracle = make_oracle(config.oracle, needs="reward")
    # The hf engine's own copy, taken before a sharded learner splits `policy` across ranks and before LoRA
    # wraps it: the engine runs a plain model and receives merged weights (vllm loads from disk).
    engine_model = copy.deepcopy(policy) if config.engine_backend == "hf" else None
    steps_per_iteration = config.learner.num_mini_batches * config.learner.num_epochs
    # PPO's value model: a copy of the policy's backbone, made before a sharded learner splits `policy` (and
    # before LoRA wraps it: the critic trains in full).
    critic = (make_critic(policy, config.learner, lr=config.algo.critic_lr,
                          total_steps=config.num_iterations * steps_per_iteration, device=device)
              if getattr(config.algo, "needs_critic", False) else None)
    policy = apply_lora(policy, config.lora)
    # A LoRA policy's reference is itself with the adapters off (Learner.reference_logprobs): no copy.
    ref_model = copy.deepcopy(policy) if config.algo.needs_reference and not config.lora.enabled else None
    learner = Learner(policy, config.learner, config.num_iterations * steps_per_iteration, ref_model,
                      temperature=config.rollout.temperature, device=device)
    engine = make_engine(
        config.engine_backend, engine_model, tokenizer, model_path=config.model.path,
        tokenizer_path=config.model.tokenizer, hf=config.engine, vllm=config.vllm_engine, device=learner.device,
        copy_model=False,
    )
    # Under torchrun every rank runs this same loop (see LocalRuntime); rank 0 alone writes the run directory.
    run_dir = shared_run_dir(config.output_dir, config.run_name, config.algo.name, learner.is_main)
    if learner.is_main:
        save_config(config, run_dir / "config.yaml")
    log.info("run %s: %d train / %d eval prompts, %d samples per iteration, %d optimizer steps per iteration",
             run_dir, len(train_prompts), len(eval_prompts), config.rollout.samples_per_iteration,
             steps_per_iteration)
    is_main = learner.is_main
    try:
        with (MetricsLogger(run_dir, config.logging, run_dir.name, dataclasses.asdict(config)) if is_main
              else _NullLogger()) as logger, \
                progress(config.num_iterations, desc=f"{config.algo.name}",
                         enabled=config.logging.progress and is_main) as bar:
            runtime = LocalRuntime(
                config, engine=engine, learner=learner, oracle=oracle, objective=config.algo,
                train_stream=batches(train_prompts, config.rollout.prompts_per_iteration, seed=config.seed),
                eval_prompts=eval_prompts if is_main else [], logger=logger, run_dir=run_dir,
                pad_token_id=tokenizer.pad_token_id, progress=bar, critic=critic,
            )
            runtime.run()
    finally:
        oracle.close()
    if config.save_final:
        learner.save(run_dir / "final", tokenizer)  # a gather on every rank; rank 0 writes
        if critic is not None:
            critic.save(run_dir / "critic")
    if is_main:
        plot_run(run_dir)
    return run_dir


class _NullLogger:
    """The metrics logger of ranks other than 0: they train, rank 0 logs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log(self, row: dict, step: int) -> None:
        return None
