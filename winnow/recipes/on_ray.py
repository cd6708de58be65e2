"""`winnow train grpo|dr-grpo|rloo|ppo|dpo|ipo|slic|simpo ... --runtime ray`: the same loops, their parts in Ray workers.

The driver (this process) holds no model: it loads the tokenizer, the prompts and the oracle, runs `Loop` with
`RLFamily` (or `PreferenceFamily`), and talks to the workers through the seam (`winnow.distributed.groups`). Each worker loads the
policy itself and builds its engine and/or learner rank the way the local runtime does (`build_learner`,
`make_engine`), so the maths is the local runtime's.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from winnow.data import batches
from winnow.distributed.groups import LearnerRankDiedError, RayActorGroup, RayCriticGroup, RayLearnerGroup
from winnow.distributed.oracle_pool import RayOraclePool
from winnow.distributed.runtime import RayRuntime, connect
from winnow.distributed.worker import WorkerSpec
from winnow.engines import make_engine
from winnow.learner.critic import make_critic
from winnow.loops.base import Loop
from winnow.loops.checkpoint import latest_checkpoint
from winnow.loops.rl import RLFamily
from winnow.oracles import make_oracle
from winnow.recipes.base import OnlineRunConfig, build_learner, check_answers, finish, load_splits, open_run, run_loop
from winnow.recipes.resume import finish_atomically, resume_command
from winnow.setup import load_policy, load_tokenizer, setup_process

log = logging.getLogger(__name__)


def check_ray_config(config: OnlineRunConfig, objective) -> None:
    """What the Ray runtime cannot do, refused at start-up with the flag that fixes it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError('--runtime ray needs Ray: pip install "winnow[ray]"') from None
    if getattr(objective, "needs_critic", False) and config.ray.num_learner_ranks > 1:
        raise ValueError(f"{objective.name}'s critic trains with the 'single' strategy only so far, so on Ray it "
                         f"needs one learner rank: --ray.num-learner-ranks 1 (the replicas still split generation)")
    if config.ray.num_learner_ranks > 1 and config.learner.strategy == "single":
        raise ValueError(f"--ray.num-learner-ranks {config.ray.num_learner_ranks} needs a sharded learner: "
                         "--learner.strategy fsdp2 or deepspeed (or --ray.num-learner-ranks 1)")
    if config.model.path is None:
        raise ValueError("no model given: pass --model.path (a hub id or a local directory)")


def train_on_ray(config: OnlineRunConfig, objective) -> Path:
    """Run policy iteration with `--runtime ray`; returns the run directory (metrics, plots, final model)."""
    check_ray_config(config, objective)

    def make_family(actor, learner, critic, oracle, tokenizer, train_prompts, eval_prompts) -> RLFamily:
        return RLFamily(
            actor=actor, learner=learner, oracle=oracle, objective=objective, rollout=config.rollout,
            eval_config=config.eval, prompts=batches(train_prompts, config.rollout.prompts_per_iteration,
                                                     seed=config.seed),
            eval_prompts=eval_prompts, seed=config.seed, pad_token_id=tokenizer.pad_token_id, critic=critic)

    return _train(config, objective, "reward", make_family, check_answers_of_prompts=True)


def train_preference_on_ray(config, oracle_needs) -> Path:
    """Online preference optimisation (`winnow train dpo|ipo|slic|simpo`) with `--runtime ray`: replicas sample
    the candidates, the driver picks and labels the pairs, the learner ranks train on them. `oracle_needs`:
    what the oracle must do for the chosen selection ("compare", and "reward" for a selector that reads scores)."""
    from winnow.exploration import make_selector
    from winnow.exploration.features import make_featurizer
    from winnow.loops.preference import PreferenceFamily

    objective, selection = config.algo, config.pairs.selection
    check_ray_config(config, objective)
    if config.offline:
        raise ValueError("--offline trains on a fixed dataset and samples nothing: use --runtime local")
    if config.ray.num_oracle_workers:
        raise ValueError("--ray.num-oracle-workers pools reward functions for the RL commands; a preference run's "
                         "oracle compares pairs in the driver: leave it at 0")
    if (selection == "xpo" or selection.startswith("apl")
            or (selection.startswith("sea") and config.pairs.sea.features == "policy")):
        raise ValueError(f"--pairs.selection {selection} needs the policy or the reference in the driver's process, "
                         "which holds no model under --runtime ray: use --runtime local, or a selection that does not "
                         "(random, best_vs_worst, or sea-* with --pairs.sea.features minilm)")
    context = {}
    if selection.startswith("sea"):
        context = {"config": config.pairs.sea, "featurize": make_featurizer(config.pairs.sea.features, policy=None,
                                                                            device="cpu")}
    selector = make_selector(selection, seed=config.seed, **context)

    def make_family(actor, learner, critic, oracle, tokenizer, train_prompts, eval_prompts) -> PreferenceFamily:
        return PreferenceFamily(
            actor=actor, learner=learner, oracle=oracle, objective=objective, selector=selector,
            rollout=config.rollout, eval_config=config.eval,
            prompts=batches(train_prompts, config.rollout.prompts_per_iteration, seed=config.seed),
            eval_prompts=eval_prompts, seed=config.seed, pad_token_id=tokenizer.pad_token_id)

    return _train(config, objective, oracle_needs, make_family, check_answers_of_prompts=False)


def _train(config: OnlineRunConfig, objective, oracle_needs, make_family, check_answers_of_prompts: bool) -> Path:
    import ray

    setup_process(config.seed, config.num_threads)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path, config.model.trust_remote_code)
    train_prompts, eval_prompts = load_splits(config, tokenizer, config.eval.max_prompts)
    oracle = make_oracle(config.oracle, needs=oracle_needs)
    runtime, started_ray = None, False
    try:
        started_ray = connect(config.ray)
        if check_answers_of_prompts:
            check_answers(oracle, train_prompts, config.data.train)
            check_answers(oracle, eval_prompts, config.data.eval or config.data.train)
        if config.ray.num_oracle_workers and oracle_needs == "reward":
            oracle.close()
            oracle = RayOraclePool(partial(make_oracle, config.oracle, needs="reward"),
                                   config.ray.num_oracle_workers, config.ray.cpus_per_worker,
                                   reference_rewards=getattr(oracle, "reference_rewards", []))
        runtime = RayRuntime.start(config.ray, worker_spec(config, objective))
        families = partial(make_family, oracle=oracle, tokenizer=tokenizer, train_prompts=train_prompts,
                           eval_prompts=eval_prompts)
        return _run(config, objective, runtime, tokenizer, train_prompts, eval_prompts, families)
    finally:
        oracle.close()
        if runtime is not None:
            runtime.shutdown()
        if started_ray:
            ray.shutdown()


def worker_spec(config: OnlineRunConfig, objective) -> WorkerSpec:
    """How every worker builds its parts: the local runtime's builders, run in the worker."""
    return WorkerSpec(
        load_policy=partial(load_policy, config.model),
        make_engine=partial(_make_engine, config),
        make_learner=partial(_make_learner, config, objective.needs_reference, config.rollout.temperature),
        make_critic=partial(_make_critic, config, objective) if getattr(objective, "needs_critic", False) else None,
        seed=config.seed, num_threads=config.num_threads, device=config.device,
        compiles=config.compiles)


def _make_engine(config: OnlineRunConfig, model: torch.nn.Module, tokenizer, device: torch.device):
    return make_engine(config.engine_backend, model, tokenizer, model_path=config.model.path,
                       tokenizer_path=config.model.tokenizer, hf=config.engine, vllm=config.vllm_engine,
                       device=device, copy_model=False)


def _make_learner(config: OnlineRunConfig, needs_reference: bool, temperature: float, policy: torch.nn.Module,
                  device: torch.device):
    return build_learner(policy, config, total_steps=config.total_steps, needs_reference=needs_reference,
                         temperature=temperature, device=device)


def _make_critic(config: OnlineRunConfig, objective, policy: torch.nn.Module, device: torch.device):
    return make_critic(policy, config.learner, lr=objective.critic_lr, total_steps=config.total_steps, device=device)


def skeleton(config: OnlineRunConfig) -> torch.nn.Module:
    """The policy's shapes on the meta device: no memory, no weights (the driver holds no model)."""
    model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)


def _run(config, objective, runtime: RayRuntime, tokenizer, train_prompts, eval_prompts, make_family) -> Path:
    actor = RayActorGroup(runtime)
    learner = RayLearnerGroup(runtime, skeleton(config), config.learner, config.rollout.temperature)
    critic = RayCriticGroup(learner) if getattr(objective, "needs_critic", False) else None
    run_dir = open_run(config, objective.name, True)
    log.info("run %s on Ray (%s): %d train / %d eval prompts, %d samples per iteration over %d engine replicas, "
             "%d learner ranks", run_dir, config.ray.placement, len(train_prompts), len(eval_prompts),
             config.rollout.samples_per_iteration, config.ray.num_engine_replicas, config.ray.num_learner_ranks)
    probe = [p.token_ids for p in (eval_prompts or train_prompts)]

    def make_loop(logger, bar) -> Loop:
        family = make_family(actor, learner, critic)
        return Loop(family, learner=learner, actor=actor, num_iterations=config.num_iterations,
                    eval_every=config.eval.every, sync=config.sync, probe=probe, seed=config.seed, logger=logger,
                    run_dir=run_dir, progress=bar, max_idle_iterations=config.rollout.max_idle_iterations)

    try:
        run_loop(config, run_dir, learner, make_loop, total=config.num_iterations, desc=objective.name,
                 critic=critic)
    except LearnerRankDiedError as e:
        raise LearnerRankDiedError(e.rank, e.__cause__ or e, advice=resume_advice(run_dir)) from e
    if config.save_final and critic is not None:
        finish_atomically(run_dir / "critic", critic.save, critic.model)
    return finish(config, run_dir, learner, tokenizer)


def resume_advice(run_dir: Path) -> str:
    """What to do after a learner rank died: the newest checkpoint and the command that resumes from it."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return "no checkpoint was written yet (--checkpoint.every N writes them); start the run again"
    return f"resume from {checkpoint} with: {resume_command(run_dir)}"
