"""The learner: optimizer steps over a TrainBatch, with micro-batches and gradient accumulation.

Batch-size vocabulary (the same words appear in logs):
- a *policy iteration* hands the learner every sample it drew: prompts_per_iteration x num_samples sequences;
- it is split into `num_mini_batches` mini-batches, one **optimizer step** each, repeated `num_epochs` times
  (so optimizer steps per iteration = num_mini_batches x num_epochs);
- each mini-batch is run `micro_batch_size` sequences at a time, gradients accumulated (memory only: the
  loss of a mini-batch is the same whatever the micro-batch size, because the loss normalisers are
  those of the whole mini-batch).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from winnow.learner.logprobs import sequence_logprobs
from winnow.learner.strategy import make_strategy
from winnow.types import TrainBatch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
"""`loss_fn(logprobs [b, T], micro_batch, *, num_sequences, num_tokens) -> (scalar loss, metrics)`; the
normalisers are the whole mini-batch's, so micro-batch losses and metrics add up to the mini-batch's."""


@dataclass
class LearnerConfig:
    """Optimizer, schedule and batching of the learner."""

    lr: float = 1e-6
    """peak learning rate of AdamW"""
    lr_schedule: str = "constant"
    """after warm-up: "constant", "linear" (to min_lr_ratio x lr) or "cosine" (to min_lr_ratio x lr)"""
    warmup_steps: int = 0
    """optimizer steps of linear warm-up from 0 to lr"""
    min_lr_ratio: float = 0.0
    """final lr of the linear and cosine schedules, as a fraction of lr"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this; 0 turns clipping off"""
    micro_batch_size: int = 64
    """sequences per forward/backward; gradients accumulate over a mini-batch (memory, not maths)"""
    num_mini_batches: int = 1
    """optimizer steps per epoch: the iteration's samples are split into this many mini-batches"""
    num_epochs: int = 1
    """passes over the iteration's samples (PPO epochs); >1 reuses samples with the clipped ratio"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    strategy: str = "single"
    """how the learner is distributed: "single" (one device); sharded strategies come as extras"""

    def __post_init__(self) -> None:
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; use one of {sorted(_SCHEDULES)}")
        for name in ("micro_batch_size", "num_mini_batches", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"learner.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"learner.lr={self.lr} must be > 0")


def _schedule(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        if kind == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


_SCHEDULES = {"constant", "linear", "cosine"}


class Learner:
    """Owns the trainable policy (and the frozen reference, when a KL term needs one)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        total_steps: int,
        ref_model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
    ):
        self.config = config
        self.strategy = make_strategy(config.strategy, device)
        self.model = self.strategy.wrap(model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.ref_model = None if ref_model is None else self.strategy.wrap_frozen(ref_model)
        self.temperature = temperature
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        factor = _schedule(config.lr_schedule, config.warmup_steps, total_steps, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.num_steps = 0

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over `batch` (a mini-batch), accumulating over micro-batches."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_sequences, num_tokens = batch.batch_size, max(batch.num_response_tokens, 1)
        totals: dict[str, float] = {}
        for micro in self._micro_batches(batch):
            with self.autocast():
                logprobs = sequence_logprobs(self.model, micro, self.temperature)
                loss, metrics = loss_fn(logprobs, micro, num_sequences=num_sequences, num_tokens=num_tokens)
            self.strategy.backward(loss)
            # Losses and metrics use the mini-batch's normalisers, so they add up across micro-batches.
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.config.max_grad_norm)
        self.strategy.step(self.optimizer)
        self.scheduler.step()
        self.num_steps += 1
        return {**totals, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}

    def train_policy(self, batch: TrainBatch, loss_fn: LossFn, needs_reference: bool = False) -> dict[str, float]:
        """All optimizer steps of one policy iteration: num_epochs x num_mini_batches."""
        batch = batch.to(self.device)
        if self.config.num_epochs > 1 or self.config.num_mini_batches > 1:
            # Later steps see an updated policy: the clipped ratio needs the pre-update logprobs.
            batch.old_logprobs = self.logprobs(self.model, batch)
        if needs_reference:
            if self.ref_model is None:
                raise ValueError("the loss has a KL term but the learner was built without a reference model")
            batch.ref_logprobs = self.logprobs(self.ref_model, batch)
        steps: list[dict[str, float]] = []
        for _ in range(self.config.num_epochs):
            order = torch.randperm(batch.batch_size, device=self.device)
            for index in order.chunk(self.config.num_mini_batches):
                steps.append(self.train_step(batch.select(index), loss_fn))
        return {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
        """Per-token logprobs of `batch` under `model` without gradients, [B, T]."""
        model.eval()
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        for start in range(0, batch.batch_size, self.config.micro_batch_size):
            rows = slice(start, start + self.config.micro_batch_size)
            micro = batch.select(rows)
            width = _used_width(micro)
            with self.autocast():
                out[rows, :width] = sequence_logprobs(model, _trim(micro, width), self.temperature)
        return out

    # ------------------------------------------------------------------ weights

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights for the engine, named as in `named_parameters()`."""
        return self.strategy.full_weights(self.model)

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Save the policy as a `transformers` checkpoint (loadable with `from_pretrained`)."""
        path = Path(path)
        self.strategy.save_pretrained(self.model, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    def _micro_batches(self, batch: TrainBatch) -> Iterator[TrainBatch]:
        for start in range(0, batch.batch_size, self.config.micro_batch_size):
            micro = batch.select(slice(start, start + self.config.micro_batch_size))
            yield _trim(micro, _used_width(micro))


def _used_width(batch: TrainBatch) -> int:
    """Columns up to the last real token of any row (batches are right-padded)."""
    used = batch.attention_mask.any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1


def _trim(batch: TrainBatch, width: int) -> TrainBatch:
    """Drop padding columns past `width`, so a micro-batch of short rows runs short."""
    fields = {}
    for name in batch.__dataclass_fields__:
        value = getattr(batch, name)
        fields[name] = value[:, :width] if value is not None and value.dim() == 2 else value
    return TrainBatch(**fields)
