"""Supervised fine-tuning: `winnow sft`, also the warm start of the quickstart.

The data are prompts with a target completion: the dataset's answer column (`--data.answer-column`)
is the completion, the tokenizer's EOS is appended, and the loss is the token-mean negative
log-likelihood of the completion tokens only (prompt tokens are context, never targets).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from winnow.config import EvalConfig, ModelConfig, save_config
from winnow.data import DataConfig, load_prompts
from winnow.engines.hf import HFEngine
from winnow.eval.accuracy import evaluate_accuracy
from winnow.learner.batch import make_sft_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.logging import LoggingConfig, MetricsLogger, progress
from winnow.logging.plot import plot_run
from winnow.oracles import OracleConfig, make_oracle
from winnow.types import Prompt


@dataclass
class SFTConfig:
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
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/RUN_NAME"""
    run_name: str | None = None
    """name of the run directory; default sft-YYYYmmdd-HHMMSS"""
    seed: int = 0
    """seeds the data order"""
    device: str = "auto"
    """"auto", "cpu" or "cuda[:N]\""""
    num_threads: int | None = None
    """torch CPU threads; None uses min(4, cores)"""


def sft_loss(logprobs: torch.Tensor, batch, *, num_sequences: int, num_tokens: float):
    """Token-mean NLL over the mini-batch's completion tokens. logprobs, mask: [B, T]."""
    nll = -(logprobs * batch.response_mask).sum() / num_tokens
    return nll, {"nll": float(nll.detach())}


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
    from winnow.runtime.setup import load_policy, make_run_dir, resolve_device, setup_process

    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    run_dir = make_run_dir(config.output_dir, config.run_name, "sft")
    save_config(config, run_dir / "config.yaml")
    if model is None:
        model, tokenizer = load_policy(config.model)
    train = sft_pairs(load_prompts(config.data, tokenizer, "train"), tokenizer)
    eval_prompts = load_prompts(config.data, tokenizer, "eval")[: config.eval.max_prompts]
    learner = Learner(model, config.learner, config.num_steps, device=device)
    oracle = make_oracle(config.oracle)
    rng = random.Random(config.seed)
    order: list[int] = []
    with MetricsLogger(run_dir, config.logging, run_dir.name, dataclasses.asdict(config)) as logger, \
            progress(config.num_steps, desc="sft", enabled=config.logging.progress) as bar:
        logger.log(_evaluate(learner, tokenizer, oracle, eval_prompts, config), step=0)
        for step in range(1, config.num_steps + 1):
            if len(order) < config.batch_size:
                order += rng.sample(range(len(train)), len(train))
            rows, order = order[: config.batch_size], order[config.batch_size :]
            batch = make_sft_batch([train[i] for i in rows], tokenizer.pad_token_id)
            metrics = {f"train/{k}": v for k, v in learner.train_step(batch.to(learner.device), sft_loss).items()}
            if step == config.num_steps or (config.eval.every > 0 and step % config.eval.every == 0):
                metrics.update(_evaluate(learner, tokenizer, oracle, eval_prompts, config))
            logger.log({**metrics, "counts/samples": float(step * config.batch_size)}, step=step)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items() if k in _SHOWN})
    oracle.close()
    learner.save(run_dir / "final", tokenizer)
    plot_run(run_dir)
    return run_dir


_SHOWN = ("train/nll", "eval/greedy_accuracy")


def _evaluate(learner: Learner, tokenizer, oracle, prompts: list[Prompt], config: SFTConfig) -> dict[str, float]:
    if not prompts:
        return {}
    engine = HFEngine(learner.model, tokenizer, device=learner.device)
    return evaluate_accuracy(
        engine, oracle, prompts, max_tokens=config.max_tokens, greedy=config.eval.greedy, k=config.eval.k,
        temperature=config.eval.temperature, correct_threshold=config.eval.correct_threshold, seed=config.seed,
    ).metrics
