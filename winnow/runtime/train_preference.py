"""`winnow train dpo|ipo|slic|simpo`: build the parts from a PreferenceTrainConfig and run the preference loop.

Online (the default): the policy samples `rollout.num_samples` responses per prompt, a pair is picked and
labelled by the preference oracle, the policy trains on it (see `winnow.runtime.preference`). Offline
(`--offline`): the pairs come from a `{prompt, chosen, rejected}` dataset instead (see
`winnow.runtime.offline_preference`). Both log `counts/...` so curves can use oracle queries as the x axis.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from winnow.config import ModelConfig, RolloutConfig, save_config
from winnow.data import DataConfig, batches, load_prompts
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.lora import LoraConfig, apply_lora
from winnow.logging import LoggingConfig, MetricsLogger, progress
from winnow.logging.plot import plot_run
from winnow.oracles import OracleConfig, RuleOracleConfig, check_oracle_config, make_oracle
from winnow.runtime.preference import PAIR_SELECTORS, PairSelection, PreferenceRuntime
from winnow.runtime.setup import load_policy, make_run_dir, resolve_device, setup_process

log = logging.getLogger(__name__)
AlgoT = TypeVar("AlgoT")


@dataclass
class PairConfig:
    """How the online loop picks the pair of responses it asks the oracle about."""

    selection: PairSelection = "best_vs_worst"
    """random (any oracle; one comparison per prompt) or best_vs_worst (oracles with scalar rewards: rule and
    reward_model; every response is scored, the best and worst form the pair)"""


@dataclass
class WinRateConfig:
    """Win rate of greedy responses against reference responses, at iteration 0, every `every` and at the end."""

    every: int = 10
    """policy iterations between evaluations; 0 evaluates only at the start and the end"""
    max_prompts: int | None = 200
    """held-out prompts used (None: all)"""
    max_tokens: int | None = None
    """generation budget for eval; None uses rollout.max_tokens"""
    reference_column: str | None = "reference_response"
    """the eval data's column with the reference response to beat; None uses the answer column itself"""


@dataclass
class PreferenceTrainConfig(Generic[AlgoT]):
    """A preference-optimisation run: `winnow train dpo|ipo|slic|simpo`."""

    algo: AlgoT
    """the preference objective: DPO, IPO, SLiC or SimPO"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="arithmetic-pref"))
    oracle: OracleConfig = field(default_factory=lambda: OracleConfig(rule=RuleOracleConfig(rewards=["closeness"])))
    """judges preferences (`--oracle.kind rule|remote|reward_model|judge`) and the win rate"""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_samples=8))
    """sampling of the online loop: num_samples >= 2 responses per prompt"""
    pairs: PairConfig = field(default_factory=PairConfig)
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=5e-6))
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (`--lora-rank 8`); the reference is the adapters turned off"""
    engine: HFEngineConfig = field(default_factory=HFEngineConfig)
    eval: WinRateConfig = field(default_factory=WinRateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    offline: bool = False
    """train on a fixed {prompt, chosen, rejected} dataset (--data.train pairs.jsonl) instead of online samples"""
    num_iterations: int = 100
    """policy iterations (online) or batches of rollout.prompts_per_iteration pairs (offline)"""
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/RUN_NAME"""
    run_name: str | None = None
    """name of the run directory; default ALGO-YYYYmmdd-HHMMSS"""
    seed: int = 0
    """seeds prompt order, pair choice and sampling"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda[:N]\""""
    num_threads: int | None = None
    """torch CPU threads; None uses min(4, cores)"""
    save_final: bool = True
    """save the trained policy to RUN_DIR/final"""

    def __post_init__(self) -> None:
        problems = []
        if not self.offline and self.rollout.num_samples < 2:
            problems.append(f"rollout.num_samples={self.rollout.num_samples}: a pair needs at least 2 responses")
        if not self.offline and self.rollout.temperature <= 0:
            problems.append("rollout.temperature must be > 0: greedy decoding gives one response, not a pair")
        if self.learner.micro_batch_size % 2:
            problems.append(f"learner.micro_batch_size={self.learner.micro_batch_size} must be even (whole pairs)")
        if self.pairs.selection not in PAIR_SELECTORS:
            problems.append(f"pairs.selection={self.pairs.selection!r} must be one of {', '.join(PAIR_SELECTORS)}")
        if problems:
            raise ValueError("invalid preference config: " + "; ".join(problems))


def train_preference(config: PreferenceTrainConfig) -> Path:
    """Run online (or, with `config.offline`, offline) preference optimisation; returns the run directory."""
    needs = ("reward", "compare") if config.pairs.selection == "best_vs_worst" else "compare"
    if not config.offline:
        check_oracle_config(config.oracle, default=type(config)(algo=config.algo).oracle, needs=needs)
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    run_dir = make_run_dir(config.output_dir, config.run_name, config.algo.name)
    save_config(config, run_dir / "config.yaml")
    policy, tokenizer = load_policy(config.model)
    # The engine's own plain copy, taken before LoRA wraps `policy`: it receives merged weights at each sync.
    engine_model = None if config.offline else copy.deepcopy(policy)
    policy = apply_lora(policy, config.lora)
    # A LoRA policy's reference is itself with the adapters off (Learner.reference_logprobs): no copy.
    ref_model = copy.deepcopy(policy) if config.algo.needs_reference and not config.lora.enabled else None
    steps_per_iteration = config.learner.num_mini_batches * config.learner.num_epochs
    learner = Learner(policy, config.learner, config.num_iterations * steps_per_iteration, ref_model,
                      temperature=1.0 if config.offline else config.rollout.temperature, device=device)
    if config.offline:
        from winnow.runtime.offline_preference import run_offline

        return _finish(config, run_dir, learner, tokenizer, lambda logger, bar: run_offline(
            config, learner=learner, tokenizer=tokenizer, logger=logger, run_dir=run_dir, progress=bar))

    train_prompts = load_prompts(config.data, tokenizer, "train")
    eval_prompts = load_prompts(config.data, tokenizer, "eval")[: config.eval.max_prompts]
    if len(train_prompts) < config.rollout.prompts_per_iteration:
        raise ValueError(f"{len(train_prompts)} training prompts but rollout.prompts_per_iteration="
                         f"{config.rollout.prompts_per_iteration}; lower it or add data")
    oracle = make_oracle(config.oracle, needs=needs)
    engine = HFEngine(engine_model, tokenizer, config.engine, device=device, copy_model=False)
    log.info("run %s: %d train / %d eval prompts, %d prompts x %d samples per iteration, pairs by %s",
             run_dir, len(train_prompts), len(eval_prompts), config.rollout.prompts_per_iteration,
             config.rollout.num_samples, config.pairs.selection)
    try:
        return _finish(config, run_dir, learner, tokenizer, lambda logger, bar: PreferenceRuntime(
            config, engine=engine, learner=learner, oracle=oracle, objective=config.algo,
            train_stream=batches(train_prompts, config.rollout.prompts_per_iteration, seed=config.seed),
            eval_prompts=eval_prompts, logger=logger, run_dir=run_dir, pad_token_id=tokenizer.pad_token_id,
            progress=bar).run())
    finally:
        oracle.close()


def _finish(config, run_dir: Path, learner: Learner, tokenizer, run) -> Path:
    """Run the loop under a logger and a progress bar, then save the model and draw the curves."""
    with MetricsLogger(run_dir, config.logging, run_dir.name, dataclasses.asdict(config)) as logger, \
            progress(config.num_iterations, desc=config.algo.name, enabled=config.logging.progress) as bar:
        run(logger, bar)
    if config.save_final:
        learner.save(run_dir / "final", tokenizer)
    plot_run(run_dir)
    return run_dir
