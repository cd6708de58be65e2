"""What every command shares: the run fields (`RunConfig`), the online commands' parts (`OnlineRunConfig`),
and the steps of building and finishing a run. A recipe module (rl.py, preference.py, sft.py, eval.py) holds
only its own config and how it wires the parts into a loop."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from tqdm.contrib.logging import logging_redirect_tqdm

from winnow.lazy import lazy_import
from winnow.config import save_config
from winnow.data import DataConfig, load_prompts
from winnow.distributed.config import RayConfig
from winnow.engines import make_engine
from winnow.engines.hf import HFEngineConfig
from winnow.engines.vllm import VLLMEngineConfig
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.lora import LoraConfig, apply_lora
from winnow.learner.sync import SyncConfig
from winnow.logging import LoggingConfig, MetricsLogger, progress
from winnow.logging.plot import plot_run
from winnow.loops.base import Loop, PhaseTimer
from winnow.loops.checkpoint import CheckpointConfig, Checkpointer, latest_checkpoint
from winnow.loops.config import RolloutConfig
from winnow.recipes.resume import finish_atomically, prepare_run_dir, resume_command, truncate_metrics
from winnow.loops.seam import LocalActor
from winnow.oracles import OracleConfig
from winnow.setup import ModelConfig
from winnow.types import Prompt

torch = lazy_import("torch")

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunConfig:
    """The fields every run has: where it writes, its seed, its device."""

    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/RUN_NAME"""
    run_name: str | None = None
    """name of the run directory; default COMMAND-YYYYmmdd-HHMMSS"""
    seed: int = 0
    """seeds prompt order, sampling and any randomly initialised weights"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda[:N]\""""
    num_threads: int | None = None
    """torch CPU threads; None uses OMP_NUM_THREADS if set, else min(4, cores) (more threads than cores thrash)"""
    save_final: bool = True
    """save the trained policy to RUN_DIR/final"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpoints that resume the run exactly (`--checkpoint.every N`); one is always written on SIGINT/SIGTERM"""
    resume: str | None = None
    """continue a run from its newest checkpoint: its run directory, or "auto" (OUTPUT_DIR/RUN_NAME if it has
    a checkpoint, else a fresh run)"""
    resume_force: bool = False
    """resume even though the config differs in a way that changes the maths (the differences are logged)"""
    overwrite: bool = False
    """delete an existing run directory of the same name and start afresh (without it, a second run into an
    existing directory is refused)"""


@dataclass(kw_only=True)
class OnlineRunConfig(RunConfig):
    """A run whose actor samples from the policy each iteration and whose learner syncs weights back."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (`--lora-rank 8`); the reference is the adapters turned off"""
    engine: HFEngineConfig = field(default_factory=HFEngineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    engine_backend: Literal["hf", "vllm"] = "hf"
    """what the Actor samples with: "hf" (embedded, settings in `engine`) or "vllm" (`pip install
    "winnow[vllm]"`, settings in `vllm_engine`)"""
    vllm_engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    """settings of the vllm engine, used when engine_backend is \"vllm\""""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    num_iterations: int = 100
    """policy iterations to run"""
    runtime: Literal["local", "ray"] = "local"
    """where the parts run: "local" (this process; one process per GPU under torchrun) or "ray" (engine
    replicas and learner ranks as Ray actors, generation split across the replicas; `pip install "winnow[ray]"`,
    settings in `ray`; RL objectives without a critic)"""
    ray: RayConfig = field(default_factory=RayConfig)
    """the Ray runtime's workers and placement (used with --runtime ray)"""
    compile_ahead: bool = True
    """with --engine.compile-decode or --learner.compile, an RL run (`winnow train grpo|ppo|...`; preference runs
    ignore it) local on one GPU: at launch, helper processes replay the first iteration on a one-layer copy of the
    model (and compile the decoder's Triton kernels) to fill the compile caches while this process loads, so a
    machine's first compiled launch compiles little itself; a launch whose graphs an earlier one's helpers compiled
    starts none (`winnow.compile_ahead`)"""

    @property
    def compiles(self) -> bool:
        """The run torch.compiles in its own processes: the embedded engine's decode glue or the learner's layers."""
        return (self.engine_backend == "hf" and self.engine.compile_decode) or self.learner.compile

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's length)."""
        return self.num_iterations * self.learner.num_mini_batches * self.learner.num_epochs


def load_splits(config: OnlineRunConfig, tokenizer, max_eval: int | None) -> tuple[list[Prompt], list[Prompt]]:
    """The train prompts and (up to `max_eval`) held-out prompts; enough train prompts for one iteration."""
    train_prompts = load_prompts(config.data, tokenizer, "train")
    eval_prompts = load_prompts(config.data, tokenizer, "eval")[:max_eval]
    if len(train_prompts) < config.rollout.prompts_per_iteration:
        raise ValueError(f"{len(train_prompts)} training prompts but rollout.prompts_per_iteration="
                         f"{config.rollout.prompts_per_iteration}; lower it (--rollout.prompts-per-iteration) or add data")
    return train_prompts, eval_prompts


def check_batching(config: OnlineRunConfig, units_per_iteration: int, unit: str) -> None:
    """Refuse at start-up mini-batches that could never all be filled: each optimizer step needs at least one
    `unit` (a sample, a pair) of the `units_per_iteration` an iteration yields at most."""
    if config.learner.num_mini_batches > units_per_iteration:
        raise ValueError(f"--learner.num-mini-batches {config.learner.num_mini_batches} is more than the "
                         f"{units_per_iteration} {unit}s an iteration yields: lower it, or raise "
                         f"--rollout.prompts-per-iteration")


def check_answers(oracle: Any, prompts: list[Prompt], data: str) -> None:
    """At load time, not mid-run: every prompt has a reference answer when a reward compares with one."""
    names = getattr(oracle, "reference_rewards", [])
    missing = [p.index for p in prompts if p.reference is None]
    if names and missing:
        raise ValueError(f"reward {names[0]!r} compares responses with reference answers, but {len(missing)} of "
                         f"{len(prompts)} rows of {data!r} have none (first: row {missing[0]}); set "
                         f"--data.answer-column to the column that holds them, or fix those rows")


def build_learner(policy: torch.nn.Module, config, *, total_steps: int, needs_reference: bool, temperature: float,
                  device: torch.device) -> Learner:
    """The policy's learner: LoRA adapters when asked (their reference is the adapters off, no copy), else a
    frozen copy of the policy as the reference when the objective needs one."""
    policy = apply_lora(policy, config.lora)
    ref_model = copy.deepcopy(policy) if needs_reference and not config.lora.enabled else None
    return Learner(policy, config.learner, total_steps, ref_model, temperature=temperature, device=device)


def build_actor(config: OnlineRunConfig, engine_model: torch.nn.Module | None, tokenizer, device) -> LocalActor:
    """The local actor: the embedded engine on `engine_model` (a plain copy of the policy, taken before LoRA or a
    sharded strategy wraps it), or vLLM loading the policy from `--model.path`."""
    engine = make_engine(config.engine_backend, engine_model, tokenizer, model_path=config.model.path,
                         tokenizer_path=config.model.tokenizer, hf=config.engine, vllm=config.vllm_engine,
                         device=device, copy_model=False)
    return LocalActor(engine)


def engine_copy(config: OnlineRunConfig, policy: torch.nn.Module,
                device: torch.device | None = None) -> torch.nn.Module | None:
    """The embedded engine's own copy of the policy (vLLM loads its own from disk). With a single-device
    learner on a GPU, `policy` moves there first (the learner would move it anyway) and the copy is made on
    the GPU: a host copy of a 1.5B model's fp32 weights took seconds of the start-up."""
    if config.engine_backend != "hf":
        return None
    if device is not None and device.type == "cuda" and config.learner.strategy == "single":
        policy.to(device)
    return copy.deepcopy(policy)


def log_startup(startup: PhaseTimer) -> None:
    """One line with what building the run cost, part by part (`time to first iteration` adds the first
    iteration's compile and graph capture to it)."""
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in startup.seconds.items())
    log.info("start-up %.1f s: %s", sum(startup.seconds.values()), parts)


def open_run(config: RunConfig, prefix: str, is_main: bool) -> Path:
    """The run directory (rank 0 makes it and writes the resolved config; under torchrun its path is shared).
    A fresh run never writes into an existing run directory; a resumed one checks its config against the
    checkpoint's (`winnow.recipes.resume`)."""
    run_dir, is_resumed = prepare_run_dir(config, prefix, is_main)
    if is_main and not is_resumed:
        save_config(config, run_dir / "config.yaml")
    return run_dir


def run_loop(config, run_dir: Path, learner: Learner, make_loop: Callable[[Any, Any], Loop], *, total: int,
             desc: str, critic: Learner | None = None) -> list[dict[str, float]]:
    """Build the loop under the run's logger and progress bar (rank 0 logs; other ranks train) and run it,
    with the run's checkpoints (a resumed run first drops metrics rows logged after its checkpoint)."""
    is_main = learner.is_main
    resume_from = latest_checkpoint(run_dir) if config.resume else None
    if resume_from is not None and is_main:
        truncate_metrics(run_dir, resume_from)
    learners = {"policy": learner, **({"critic": critic} if critic is not None else {})}
    with (MetricsLogger(run_dir, config.logging, run_dir.name, dataclasses.asdict(config)) if is_main
          else NullLogger()) as logger, \
            progress(total, desc=desc, enabled=config.logging.progress and is_main) as bar, \
            (contextlib.nullcontext() if bar.disable else logging_redirect_tqdm()):
        # Under a drawn bar, log records go through tqdm.write, above the bar, instead of tearing it.
        loop = make_loop(logger, bar)
        loop.checkpointer = Checkpointer(run_dir, config.checkpoint, learners,
                                         config_yaml=(run_dir / "config.yaml").read_text() if is_main else "",
                                         resume_from=resume_from, resume_command=resume_command(run_dir))
        return loop.run()


def finish(config: RunConfig, run_dir: Path, learner: Learner, tokenizer) -> Path:
    """Save the trained policy (a gather on every rank; rank 0 writes) and draw the learning curves. `final/`
    appears complete or not at all (written aside, fsynced, renamed)."""
    if config.save_final:
        finish_atomically(run_dir / "final", lambda tmp: learner.save(tmp, tokenizer), learner.model)
    if learner.is_main:
        plot_run(run_dir)
    return run_dir


class NullLogger:
    """The metrics logger of ranks other than 0 (they train, rank 0 logs) and of compile-ahead helpers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log(self, row: dict, step: int) -> None:
        return None
