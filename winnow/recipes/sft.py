"""`winnow sft`: supervised fine-tuning, also the warm start of the quickstart.

The data are prompts with a target completion: the dataset's answer column (`--data.answer-column`) is the
completion, the tokenizer's EOS is appended, and the loss is the token-mean negative log-likelihood of the
completion tokens only (prompt tokens are context, never targets). Held-out accuracy is evaluated through the
oracle as it goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from winnow.data import DataConfig, load_prompts
from winnow.engines.hf import HFEngine
from winnow.learner.learner import Learner, LearnerConfig
from winnow.logging import LoggingConfig
from winnow.loops.base import Loop
from winnow.loops.config import EvalConfig
from winnow.loops.sft import SFTFamily
from winnow.oracles import OracleConfig, check_oracle_config, make_oracle
from winnow.recipes.base import RunConfig, finish, open_run, run_loop
from winnow.setup import ModelConfig, load_policy, resolve_device, setup_process
from winnow.types import Prompt


@dataclass(kw_only=True)
class SFTConfig(RunConfig):
    """A supervised fine-tuning run: `winnow sft`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=1e-5, warmup_steps=10))
    oracle: OracleConfig = field(default_factory=OracleConfig)
    """judges held-out accuracy during SFT (the first reward function is the verifier)"""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, k=0))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    batch_size: int = 64
    """sequences per optimizer step"""
    num_steps: int = 500
    """optimizer steps"""
    max_tokens: int = 64
    """generation budget of the held-out evaluation"""


def sft_pairs(prompts: list[Prompt], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) for each prompt; its reference is the completion."""
    pairs = []
    for p in prompts:
        if p.reference is None:
            raise ValueError(
                f"row {p.index} has no completion: SFT trains on the answer column (--data.answer-column)"
            )
        ids = tokenizer(p.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((p.token_ids, ids))
    return pairs


def train_sft(config: SFTConfig, model=None, tokenizer=None) -> Path:
    """Fine-tune `model` (or the one at config.model.path) on the completions; returns the run dir."""
    check_oracle_config(config.oracle, default=SFTConfig().oracle, needs="reward")
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    if model is None:
        model, tokenizer = load_policy(config.model)
    train = sft_pairs(load_prompts(config.data, tokenizer, "train"), tokenizer)
    eval_prompts = load_prompts(config.data, tokenizer, "eval")[: config.eval.max_prompts]
    learner = Learner(model, config.learner, config.num_steps, device=device)
    oracle = make_oracle(config.oracle, needs="reward")
    run_dir = open_run(config, "sft", learner.is_main)

    def make_loop(logger, bar) -> Loop:
        family = SFTFamily(
            learner=learner, pairs=train, batch_size=config.batch_size, oracle=oracle,
            eval_prompts=eval_prompts if learner.is_main else [], eval_config=config.eval,
            max_tokens=config.max_tokens, seed=config.seed, pad_token_id=tokenizer.pad_token_id,
            # a fresh engine on the current weights at each evaluation (the model is small next to a sync)
            eval_engine=lambda: HFEngine(learner.model, tokenizer, device=learner.device))
        return Loop(family, learner=learner, actor=None, num_iterations=config.num_steps,
                    eval_every=config.eval.every, logger=logger, run_dir=run_dir, progress=bar)

    try:
        run_loop(config, run_dir, learner, make_loop, total=config.num_steps, desc="sft")
    finally:
        oracle.close()
    return finish(config, run_dir, learner, tokenizer)
