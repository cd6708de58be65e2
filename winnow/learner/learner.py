"""The learner: optimizer steps over a TrainBatch, with micro-batches and gradient accumulation.

Batch-size vocabulary (the same words appear in logs):
- a *policy iteration* hands the learner every sample it drew: prompts_per_iteration x num_samples sequences;
- it is split into `num_mini_batches` mini-batches, one **optimizer step** each, repeated `num_epochs` times
  (so optimizer steps per iteration = num_mini_batches x num_epochs);
- each mini-batch is run `micro_batch_size` sequences at a time, gradients accumulated (memory only: the
  loss of a mini-batch is the same whatever the micro-batch size, because the loss normalisers are
  those of the whole mini-batch).

Data parallelism (strategies `fsdp2` and `deepspeed`, launched with `torchrun`): every method takes this
rank's *local rows*; `shard(batch)` picks them (rows rank, rank + world_size, ...). A mini-batch is the
union of the ranks' local mini-batches, so `num_mini_batches` and `micro_batch_size` count per rank. The
loss normalisers (`num_sequences`, `num_tokens`) are all-reduced before the loss is computed, so each
rank's loss is its share of the *global* mini-batch loss and the ranks' losses sum to it; the strategy
scales the backward pass by world_size to undo data-parallel gradient averaging. The step, its loss and
metrics are therefore those of one process running the whole mini-batch. Ranks with fewer rows are padded
with fully masked rows (zero loss, zero weight) so every rank runs the same number of forward passes, as
sharded parameters need.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from winnow import compile_ahead
from winnow.lazy import lazy_function, lazy_import, no_grad
from winnow.learner import memory_budget
from winnow.learner.lora import adapters_off, is_lora, merged_weights, save_merged
from winnow.learner.strategy import StrategyConfig, make_strategy
from winnow.types import TrainBatch

torch = lazy_import("torch")
sequence_logprobs = lazy_function("winnow.learner.logprobs", "sequence_logprobs")  # defines a torch.autograd.Function
use_shared_attention = lazy_function("winnow.learner.shared_prompts", "use_shared_attention")
shared_kernel_available = lazy_function("winnow.learner.shared_prompts", "available")

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """`max_bad_steps` optimizer steps in a row had a NaN/inf loss or gradient norm."""


LossFn = Callable[..., tuple["torch.Tensor", dict[str, "float | torch.Tensor"]]]
"""`loss_fn(logprobs [b, T], micro_batch, *, num_sequences, num_tokens) -> (scalar loss, metrics)`; the
normalisers are the whole mini-batch's, so micro-batch losses and metrics add up to the mini-batch's. A metric
may stay a 0-d tensor on the device: the learner sums them there and copies them to the host once per step."""

ForwardFn = Callable[["torch.nn.Module", TrainBatch], "torch.Tensor"]
"""`forward(model, batch) -> [B, T]` per-token outputs of the trained model, aligned with `response_mask`:
`sequence_logprobs` for a policy, `critic.token_values` for PPO's critic."""


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
    micro_batch_tokens: int = 0
    """0: micro-batches of micro_batch_size sequences. N: each micro-batch takes as many of the length-sorted
    sequences as fit N tokens of padded width (sequences x its longest), so short sequences train in fewer, larger
    micro-batches and long ones in smaller ones, at a steady memory peak; a sequence longer than N trains alone"""
    micro_batch_memory: float = 0.0
    """0: off. f in (0, 1]: micro-batches by tokens (as micro_batch_tokens), the budget set at every step so that
    the saved activations take about f of the GPU memory free at the step's start (an estimate per token from the
    model's shape, `winnow.learner.memory_budget`); logged as train/micro_batch_tokens. GPU only"""
    num_mini_batches: int = 1
    """optimizer steps per epoch: the iteration's samples are split into this many mini-batches"""
    num_epochs: int = 1
    """passes over the iteration's samples (PPO epochs); >1 reuses samples with the clipped ratio"""
    max_bad_steps: int = 3
    """optimizer steps in a row whose loss or gradient norm is NaN/inf before the run stops with an error; each
    such step is skipped (never applied) and counted as `train/skipped_steps`"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    compile: bool = False
    """torch.compile each decoder layer (fuses norms, RoPE and activations) and, with fused_logprobs, the head's
    log-softmax and its gradient (single strategy): the first steps pay the compile (about 10-15 s on a GPU),
    the learner then runs ~1.3x faster"""
    compile_dynamic: bool = False
    """with compile: symbolic batch and length dimensions from the first step. False (the default) compiles the
    first micro-batch width for its exact shape, and again with a symbolic length at the next width. Measured at
    0.5B on one H200 (`benchmarks/learner_profile.py`): on long-tailed response lengths, True made the step
    1.36 s against 1.58 s for +3.6 s of first-step compile; on fixed lengths it made it 2.56 s against 2.42 s"""
    share_prompts: bool = False
    """rows with the same prompt (a GRPO group's samples, a preference pair) run the prompt's tokens once in the
    policy's forward and backward: each micro-batch is one packed row, every prompt once followed by its
    responses, no padding (`winnow.learner.shared_prompts`); the same logprobs and gradients up to float rounding.
    A token budget then counts the packed tokens (each prompt once per micro-batch), not the padded width.
    Saves (n - 1) / n of the prompt tokens' work; on a GPU attention runs FlashAttention's variable-length kernel"""
    forward_while_scoring: bool = True
    """RL: the forward of an iteration's first micro-batch runs on the device while the host scores the rollout
    (its loss and backward once the advantages exist), so the device does not wait idle on the reward. The same
    step, bit for bit. Taken where the iteration is one optimizer step (num_mini_batches = num_epochs = 1) on the
    single strategy without micro_batch_memory, for objectives without a critic or a reference; a rollout that
    loses samples in scoring (unscored, dropped groups) throws that forward away and trains as before"""
    fused_logprobs: bool = True
    """project hidden states to token logprobs a chunk of rows at a time (forward and backward), never
    holding [B, T, vocab] logits; Llama-family models on the single strategy (else the model's forward)"""
    strategy: str = "single"
    """how the learner is distributed: "single" (one device), "fsdp2" or "deepspeed" (under torchrun)"""
    sharding: StrategyConfig = field(default_factory=StrategyConfig)
    """options of the sharded strategies: ZeRO stage, CPU offload, mixed precision, backend"""

    def __post_init__(self) -> None:
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"--learner.lr-schedule {self.lr_schedule!r}: use one of {sorted(_SCHEDULES)}")
        for name in ("micro_batch_size", "num_mini_batches", "num_epochs", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--learner.{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"--learner.micro-batch-tokens {self.micro_batch_tokens} must be >= 0 (0: micro-batches "
                             "of --learner.micro-batch-size sequences)")
        if not 0 <= self.micro_batch_memory <= 1:
            raise ValueError(f"--learner.micro-batch-memory {self.micro_batch_memory} must be in [0, 1]: the fraction "
                             "of free GPU memory for a micro-batch's activations (0: off)")
        if self.micro_batch_memory and self.micro_batch_tokens:
            raise ValueError("--learner.micro-batch-memory and --learner.micro-batch-tokens both size micro-batches "
                             "by tokens: give one of them")
        if self.lr <= 0:
            raise ValueError(f"--learner.lr {self.lr} must be > 0")
        if self.compile and self.strategy != "single":
            raise ValueError(f"learner.compile works with strategy 'single', not {self.strategy!r}: "
                             "drop --learner.compile or train on one device")
        if self.compile_dynamic and not self.compile:
            raise ValueError("--learner.compile-dynamic sets how --learner.compile compiles: add --learner.compile "
                             "or drop --learner.compile-dynamic")


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


@dataclass
class ForwardAhead:
    """The forward of the first micro-batch of the optimizer step `train_policy(batch)` will take, run before the
    batch's advantages exist (`Learner.forward_ahead`): `train_policy(batch, ..., ahead=this)` takes its loss and
    backward instead of running it again."""

    batch: TrainBatch
    """the batch it was run for: `train_policy` must get this object (its advantages filled in since)"""
    order: torch.Tensor
    """[U] the units' order of the step's one epoch, drawn as `train_policy` draws it"""
    outputs: torch.Tensor
    """[b, T] the first micro-batch's forward outputs (logprobs), with their autograd graph"""


class Learner:
    """Owns the trainable policy (and the frozen reference, when a KL term needs one).

    A LoRA policy (a peft model, see `winnow.learner.lora`) trains its adapters only; its reference is the
    same model with the adapters off (pass no `ref_model`), and the engine gets merged weights.

    The same class trains PPO's critic (`winnow.learner.critic`): `forward` then computes values instead
    of logprobs, and the loss function is a value loss.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        total_steps: int,
        ref_model: torch.nn.Module | None = None,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        forward: ForwardFn | None = None,
    ):
        self.config = config
        self.is_lora = is_lora(model)
        if self.is_lora and config.strategy != "single":
            raise ValueError(f"LoRA with learner.strategy={config.strategy!r} is not supported yet: use "
                             "--learner.strategy single (one GPU holds a frozen base model and small adapters), "
                             "or --lora-rank 0")
        self.strategy = make_strategy(config.strategy, device, config.sharding)
        if config.micro_batch_memory and self.strategy.device.type != "cuda":
            raise ValueError(f"--learner.micro-batch-memory sizes micro-batches from free GPU memory, and this learner "
                             f"runs on {self.strategy.device.type}: give --learner.micro-batch-tokens instead")
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.is_lora:  # the frozen embeddings' output needs grad, or checkpointed blocks get none
                model.enable_input_require_grads()
        if config.share_prompts and shared_kernel_available(self.strategy.device):
            use_shared_attention(model)  # the packed rows' segments go to the variable-length kernel
            if ref_model is not None:
                use_shared_attention(ref_model)
        if config.compile:
            _compile_layers(model, config.compile_dynamic)
        factor = _schedule(config.lr_schedule, config.warmup_steps, total_steps, config.min_lr_ratio)
        self.model, self.optimizer, self.scheduler = self.strategy.setup(
            model, self._make_optimizer, lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
            config.max_grad_norm,
        )
        self.ref_model = None if ref_model is None else self.strategy.wrap_frozen(ref_model)
        self.temperature = temperature
        self.num_steps = 0
        """optimizer steps applied (a skipped step is not one)"""
        self.num_skipped_steps = 0
        """optimizer steps skipped because their loss or gradient norm was not finite"""
        self.num_bad_steps_in_a_row = 0
        self.last_token_budget = config.micro_batch_tokens
        """the token budget the last micro-batch plan used (from micro_batch_memory: the memory free then)"""
        # Sharded strategies gather parameters in the root module's forward, so they keep the full forward.
        self.fused_head = config.fused_logprobs and config.strategy == "single"
        # What the trained model computes per token: the policy's logprobs, or a critic's values.
        self.forward: ForwardFn = forward or self._logprobs_forward()

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        # One fused kernel for the whole update on a single GPU (sharded strategies keep the default).
        fused = c.strategy == "single" and self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                                 weight_decay=c.weight_decay, fused=fused or None)

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def is_main(self) -> bool:
        """True on the rank that logs, evaluates and writes files (rank 0)."""
        return self.strategy.rank == 0

    def shard(self, batch: TrainBatch, rows_per_unit: int = 1) -> TrainBatch:
        """This rank's rows of a batch every rank holds: units rank, rank + world_size, ... (a unit is
        `rows_per_unit` consecutive rows that stay together: 2 for a preference pair)."""
        if self.strategy.world_size == 1:
            return batch
        units = torch.arange(batch.batch_size // rows_per_unit)[self.strategy.rank::self.strategy.world_size]
        return batch.select(_unit_rows(units, rows_per_unit))

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ steps

    @compile_ahead.gate("learner")
    def forward_ahead(self, batch: TrainBatch, rows_per_unit: int = 1) -> ForwardAhead | None:
        """Launch the forward of the first micro-batch that `train_policy(batch)` will train, before `batch` has its
        advantages: the device runs it while the host scores the rollout. None where the step cannot take it
        (see `LearnerConfig.forward_while_scoring`). Nothing here waits for the device."""
        c = self.config
        if not (c.forward_while_scoring and self.strategy.world_size == 1 and c.num_epochs == 1
                and c.num_mini_batches == 1 and not c.micro_batch_memory and batch.batch_size):
            return None
        self.model.train()
        order = torch.randperm(batch.batch_size // rows_per_unit, device=self.device)  # as train_policy draws it
        mini_batch = batch.to(self.device).select(_unit_rows(order, rows_per_unit))
        micro = next(self._micro_batches(mini_batch, rows_per_unit))
        with self.autocast():
            outputs = self.forward(self.model, micro)  # [b, T]
        return ForwardAhead(batch, order, outputs)

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, rows_per_unit: int = 1,
                   first_outputs: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step over `batch` (a mini-batch), accumulating over micro-batches.

        rows_per_unit: consecutive rows that must stay together and in order in one micro-batch (2 for
        preference pairs, [chosen, rejected]); micro-batches are formed from whole units.
        first_outputs: the first micro-batch's forward outputs, already run (`forward_ahead`).
        """
        self.model.train()
        self.strategy.zero_grad()
        # Global normalisers: every rank's loss is its share of the whole mini-batch's (see the module doc).
        # Counted before padding: padding rows are no sequences and have no tokens.
        counts = torch.tensor([float(batch.batch_size), float(batch.num_response_tokens)], dtype=torch.float64)
        num_sequences, num_tokens = self.strategy.all_reduce_sum(counts).tolist()
        num_sequences, num_tokens = int(num_sequences), max(num_tokens, 1.0)
        batch = self._pad_to_global_max(batch)
        totals: dict[str, float | torch.Tensor] = {}
        micro_batches = list(self._micro_batches(batch, rows_per_unit))
        if first_outputs is not None and first_outputs.shape != micro_batches[0].response_mask.shape:
            raise RuntimeError(f"the forward run ahead has shape {tuple(first_outputs.shape)}, the step's first "
                               f"micro-batch {tuple(micro_batches[0].response_mask.shape)}: it was run for other rows")
        for i, micro in enumerate(micro_batches):
            with self.autocast():
                if i == 0 and first_outputs is not None:
                    outputs = first_outputs
                else:
                    outputs = self.forward(self.model, micro)  # [b, T] logprobs (a critic: values)
                loss, metrics = loss_fn(outputs, micro, num_sequences=num_sequences, num_tokens=num_tokens)
            self.strategy.backward(loss, is_last_micro_batch=i == len(micro_batches) - 1)
            # Losses and metrics use the mini-batch's normalisers, so they add up across micro-batches.
            _add_metrics(totals, {"loss": loss, **metrics})
        totals = _host_floats(totals)
        if self.strategy.world_size > 1:  # ... and across ranks: one all-reduce for all of them
            summed = self.strategy.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64))
            totals = dict(zip(totals, summed.tolist()))
        if self.config.micro_batch_memory:  # the budget this step's free memory gave
            totals["micro_batch_tokens"] = float(self.last_token_budget)
        lr = self.scheduler.get_last_lr()[0]
        # A non-finite loss (the same on every rank: it was all-reduced) is never stepped on; a non-finite
        # gradient norm (global) makes the strategy skip the step itself. Either way nothing is applied.
        if math.isfinite(totals["loss"]):
            grad_norm = float(self.strategy.optimizer_step())
        else:
            self.strategy.zero_grad()
            grad_norm = math.nan
        is_bad = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))
        self._count_step(is_bad, totals["loss"], grad_norm)
        return {**totals, "grad_norm": grad_norm, "lr": lr, "skipped_steps": float(is_bad)}

    def _count_step(self, is_bad: bool, loss: float, grad_norm: float) -> None:
        """Count an applied or skipped step; `max_bad_steps` skipped in a row stop the run."""
        if not is_bad:
            self.num_steps += 1
            self.num_bad_steps_in_a_row = 0
            return
        self.num_skipped_steps += 1
        self.num_bad_steps_in_a_row += 1
        log.warning("optimizer step skipped: loss %s, gradient norm %s (%d in a row)", loss, grad_norm,
                    self.num_bad_steps_in_a_row)
        if self.num_bad_steps_in_a_row >= self.config.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.num_bad_steps_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(last: loss {loss}, gradient norm {grad_norm}); none was applied. Lower --learner.lr, check "
                f"the rewards and the data, or allow more with --learner.max-bad-steps")

    @compile_ahead.gate("learner")
    def train_policy(
        self, batch: TrainBatch, loss_fn: LossFn, needs_reference: bool = False,
        on_mini_batch: Callable[[TrainBatch], dict[str, float]] | None = None, rows_per_unit: int = 1,
        ahead: ForwardAhead | None = None,
    ) -> dict[str, float]:
        """All optimizer steps of one policy iteration: num_epochs x num_mini_batches, each over a shuffled
        mini-batch of whole units (`rows_per_unit` consecutive rows that stay together and in order: 1 for RL
        samples, 2 for preference pairs [chosen, rejected]). Returns the mean of the steps' metrics.

        `on_mini_batch(mini_batch) -> metrics`, when given, runs after each policy step on the same rows
        (PPO's critic step); its metrics are averaged with the policy's. `batch.old_logprobs` and
        `batch.ref_logprobs` that are already filled (PPO fills them to shape its rewards) are kept;
        reference logprobs are computed once, before any step.

        `ahead`: `forward_ahead(batch)`'s result; the step takes its first micro-batch's forward from it.
        """
        if ahead is not None and ahead.batch is not batch:
            raise ValueError("train_policy got a forward run ahead for another batch: pass the batch that "
                             "forward_ahead ran for")
        if batch.batch_size % rows_per_unit or (self.config.micro_batch_size % rows_per_unit
                                                and not self._by_tokens):
            raise ValueError(f"learner.micro_batch_size={self.config.micro_batch_size} and the batch's "
                             f"{batch.batch_size} rows must be multiples of {rows_per_unit}: an odd size would split "
                             f"a unit of rows that belong together (a preference pair's chosen and rejected)")
        batch = batch.to(self.device)
        if batch.old_logprobs is None and (self.config.num_epochs > 1 or self.config.num_mini_batches > 1):
            # Later steps see an updated policy: the clipped ratio needs the pre-update logprobs.
            batch.old_logprobs = self.logprobs(self.model, batch)
        if needs_reference and batch.ref_logprobs is None:
            batch.ref_logprobs = self.reference_logprobs(batch)
        steps: list[dict[str, float]] = []
        for _ in range(self.config.num_epochs):
            if ahead is not None:  # one epoch of one mini-batch (forward_ahead checked), in the order it drew
                order, first_outputs, ahead = ahead.order, ahead.outputs, None
            else:
                order = torch.randperm(batch.batch_size // rows_per_unit, device=self.device)
                first_outputs = None
            # tensor_split: exactly num_mini_batches steps on every rank, however few units it holds
            for units in order.tensor_split(self.config.num_mini_batches):
                # Fewer units than mini-batches (groups were dropped) leaves some empty: no step, no crash.
                if self.strategy.all_reduce_max(len(units)) == 0:
                    continue
                mini_batch = batch.select(_unit_rows(units, rows_per_unit))
                steps.append(self.train_step(mini_batch, loss_fn, rows_per_unit, first_outputs))
                if on_mini_batch is not None:
                    steps[-1].update(on_mini_batch(mini_batch))
        if not steps:
            raise ValueError("train_policy got an empty batch: nothing to train on")
        means = {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}
        return {**means, "skipped_steps": sum(s["skipped_steps"] for s in steps)}  # a count, not a mean

    def predict(self, batch: TrainBatch) -> torch.Tensor:
        """The trained model's own per-token outputs (`forward`: logprobs, or a critic's values) without
        gradients, [B, T]."""
        return self._no_grad_forward(self.model, batch, self.forward)

    def evaluate_tokens(self, batch: TrainBatch, forward: ForwardFn) -> torch.Tensor:
        """`forward(policy, micro_batch) -> [b, T]` over `batch` without gradients, [B, T] float32: per-token
        held-out numbers (an SFT run's assistant-token accuracy). Every rank calls it (sharded forwards gather)."""
        return self._no_grad_forward(self.model, batch, forward)

    def logprobs(self, model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
        """Per-token logprobs of `batch` under `model` without gradients, [B, T]."""
        return self._no_grad_forward(model, batch, self._logprobs_forward())

    def _logprobs_forward(self) -> ForwardFn:
        """`sequence_logprobs` with this learner's temperature, head and compile settings."""
        c = self.config
        return partial(sequence_logprobs, temperature=self.temperature, fused_head=self.fused_head,
                       compile_head=c.compile, compile_dynamic=c.compile_dynamic, share_prompts=c.share_prompts)

    @compile_ahead.gate("learner")
    @no_grad
    def _no_grad_forward(self, model: torch.nn.Module, batch: TrainBatch, forward: ForwardFn) -> torch.Tensor:
        """`forward(model, micro_batch)` over `batch` a micro-batch at a time, [B, T] float32."""
        model.eval()
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        plan = self._micro_batch_rows(batch, equal_counts=False) if batch.batch_size else []
        # Sharded parameters are gathered inside forward, a collective: every rank runs as many forwards.
        num_forwards = self.strategy.all_reduce_max(len(plan))
        for i in range(num_forwards):
            rows = plan[i] if i < len(plan) else torch.zeros(1, dtype=torch.long)
            micro = batch.select(rows)
            width = _used_width(micro)
            with self.autocast():
                outputs = forward(model, _trim(micro, width))
            if i < len(plan):  # else a padding forward, thrown away
                out[rows.to(out.device), :width] = outputs.float()
        return out

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token logprobs of `batch` under the reference policy, [B, T]: the frozen copy, or for a LoRA
        policy the same model with its adapters off (the base weights never change, so that is the initial
        policy, with no second copy in memory)."""
        if self.ref_model is not None:
            return self.logprobs(self.ref_model, batch)
        if self.is_lora:
            with adapters_off(self.model):
                return self.logprobs(self.model, batch)
        raise ValueError("the loss needs a reference policy but the learner was built without a reference model "
                         "(pass ref_model, or a LoRA policy whose reference is its adapters off)")

    # ------------------------------------------------------------------ weights

    def named_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights for the engine, named as in `named_parameters()`; a collective under a
        sharded strategy: every rank must iterate it to the end. `gather_dtype`: the dtype sharded weights are
        gathered in (the engine's; see `Strategy.full_weights`). A LoRA policy gives its adapters merged
        into the base weights, under the base model's names (the engine runs a plain model)."""
        return merged_weights(self.model) if self.is_lora else self.strategy.full_weights(gather_dtype)

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Save the policy as a `transformers` checkpoint (loadable with `from_pretrained`); sharded
        strategies gather on every rank and write on rank 0. A LoRA policy is saved merged, its adapter
        alone in `path/adapter`."""
        path = Path(path)
        if self.is_lora:
            save_merged(self.model, path)
        else:
            self.strategy.save_pretrained(path)
        if tokenizer is not None and self.is_main:
            tokenizer.save_pretrained(path)
        return path

    def save_checkpoint(self, path: str | Path) -> Path:
        """Everything needed to resume: model, optimizer, scheduler and step count (every rank calls it)."""
        path = Path(path)
        self.strategy.save_checkpoint(path, {"num_steps": self.num_steps})
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from `save_checkpoint`'s directory, with the same strategy and world size."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}: pass a directory written by Learner.save_checkpoint")
        self.num_steps = int(self.strategy.load_checkpoint(path)["num_steps"])

    def _pad_to_global_max(self, batch: TrainBatch) -> TrainBatch:
        """Append fully masked copies of row 0 until this rank has as many rows as the largest rank."""
        target = self.strategy.all_reduce_max(batch.batch_size)
        if target == batch.batch_size:
            return batch
        if batch.batch_size == 0:
            raise ValueError("a rank got no rows: give the learner at least world_size sequences")
        pad = batch.select(torch.zeros(target - batch.batch_size, dtype=torch.long, device=batch.input_ids.device))
        pad.response_mask = torch.zeros_like(pad.response_mask)
        pad.advantages = torch.zeros_like(pad.advantages)
        fields = {}
        for name in batch.__dataclass_fields__:
            a, b = getattr(batch, name), getattr(pad, name)
            fields[name] = None if a is None else torch.cat([a, b])
        return TrainBatch(**fields)

    def _micro_batches(self, batch: TrainBatch, rows_per_unit: int = 1) -> Iterator[TrainBatch]:
        """The mini-batch's micro-batches, each trimmed to its longest row. The loss uses the mini-batch's
        normalisers, so the order of units is free; the order of rows inside a unit is kept."""
        unit = rows_per_unit
        if batch.batch_size % unit or (self.config.micro_batch_size % unit and not self._by_tokens):
            raise ValueError(f"{batch.batch_size} rows and micro_batch_size={self.config.micro_batch_size} must "
                             f"both be multiples of {unit} (rows that belong together)")
        for rows in self._micro_batch_rows(batch, unit):
            micro = batch.select(rows)
            yield _trim(micro, _used_width(micro))

    @property
    def _by_tokens(self) -> bool:
        return bool(self.config.micro_batch_tokens or self.config.micro_batch_memory)

    def token_budget(self) -> int:
        """Tokens a micro-batch may hold (of padded width; with `share_prompts`, packed): `micro_batch_tokens`, or
        from `micro_batch_memory` and the memory free now (0: micro-batches by rows)."""
        if not self.config.micro_batch_memory:
            return self.config.micro_batch_tokens
        model_config = getattr(self.model, "config", None)
        if model_config is None or not hasattr(model_config, "intermediate_size"):
            raise ValueError("--learner.micro-batch-memory estimates activations from a Llama-family config "
                             "(hidden_size, intermediate_size, num_hidden_layers): give --learner.micro-batch-tokens")
        reserve = memory_budget.step_reserve_bytes(self.model, model_config.vocab_size)
        return memory_budget.budget_tokens(self.config.micro_batch_memory, memory_budget.free_device_bytes(self.device),
                                           reserve, memory_budget.activation_bytes_per_token(model_config))

    def _micro_batch_rows(self, batch: TrainBatch, rows_per_unit: int = 1, equal_counts: bool = True
                          ) -> list[torch.Tensor]:
        """Each micro-batch's row indices. Length-aware: units (`rows_per_unit` consecutive rows) sorted longest
        first, so a micro-batch holds units of similar length; `micro_batch_size` rows each, or with
        `micro_batch_tokens` as many units as fit that many tokens of padded width. `equal_counts`: every rank
        gets as many micro-batches (the sharded strategies' backward is a collective), by splitting its largest."""
        unit = rows_per_unit
        lengths = batch.attention_mask.sum(dim=1).view(-1, unit).amax(dim=1)  # [U]
        grouped = self.config.share_prompts and unit == 1 and batch.group_index is not None
        if grouped:
            units, lengths = _by_group(batch.group_index, lengths)  # a group's rows together: they share a prompt
        else:
            units = lengths.argsort(descending=True, stable=True)
            lengths = lengths[units]
        if self._by_tokens:
            self.last_token_budget = self.token_budget()
            if grouped:  # packed rows: the tokens they run, each prompt once per micro-batch, no padding
                sizes = _packed_budget_sizes(*_packed_costs(batch, units), self.last_token_budget)
            else:
                sizes = _token_budget_sizes(lengths.tolist(), unit, self.last_token_budget)
            if equal_counts and self.strategy.world_size > 1:
                sizes = _split_largest(sizes, self.strategy.all_reduce_max(len(sizes)))
        else:
            per = self.config.micro_batch_size // unit
            sizes = [min(per, len(units) - start) for start in range(0, len(units), per)]
        return [_unit_rows(chunk, unit) for chunk in units.split(sizes)]


def _by_group(group_index: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered so that each group's rows are consecutive, groups longest first: (order [B], each ordered row's
    group length [B], non-increasing, which a token budget sizes micro-batches by)."""
    _, groups = torch.unique(group_index, return_inverse=True)
    group_lengths = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype, device=lengths.device)
    group_lengths = group_lengths.scatter_reduce(0, groups, lengths, reduce="amax")[groups]  # [B]
    order = groups.argsort(stable=True)
    order = order[group_lengths[order].argsort(descending=True, stable=True)]
    return order, group_lengths[order]


def _token_budget_sizes(lengths: list[int], rows_per_unit: int, budget: int) -> list[int]:
    """Units per micro-batch for units sorted longest first (`lengths`, tokens of each unit's longest row): as
    many as fit `budget` tokens of padded width (units x rows_per_unit x the first unit's length), at least one."""
    sizes, start = [], 0
    while start < len(lengths):
        size = max(1, budget // (max(lengths[start], 1) * rows_per_unit))
        sizes.append(min(size, len(lengths) - start))
        start += sizes[-1]
    return sizes


def _packed_costs(batch: TrainBatch, order: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """For the rows in `order`: prompt tokens (before the first response-mask token), the tokens after them, and
    the group index."""
    from winnow.learner.shared_prompts import prompt_lengths

    lengths, prompts = batch.attention_mask.sum(dim=1), prompt_lengths(batch)
    rows = torch.stack([prompts[order], (lengths - prompts)[order], batch.group_index[order].to(lengths.device)])
    prompts, responses, groups = rows.tolist()
    return prompts, responses, groups


def _packed_budget_sizes(prompts: list[int], responses: list[int], groups: list[int], budget: int) -> list[int]:
    """Rows per micro-batch for rows ordered by group, packed with each prompt once (`shared_prompts`): as many as
    fit `budget` packed tokens (a group's prompt counted in each micro-batch its rows reach), at least one."""
    sizes, tokens, count, group = [], 0, 0, None
    for prompt, response, index in zip(prompts, responses, groups):
        cost = response + (prompt if count == 0 or index != group else 0)
        if count and tokens + cost > budget:
            sizes.append(count)
            tokens, count, cost = 0, 0, prompt + response
        tokens, count, group = tokens + cost, count + 1, index
    return sizes + [count] if count else sizes


def _split_largest(sizes: list[int], count: int) -> list[int]:
    """`sizes` split into `count` micro-batches (count <= their sum), halving the largest one at a time."""
    sizes = list(sizes)
    while len(sizes) < count:
        i = max(range(len(sizes)), key=sizes.__getitem__)
        half = sizes[i] // 2
        sizes[i : i + 1] = [sizes[i] - half, half]
    return sizes


def _add_metrics(totals: dict[str, float | torch.Tensor], metrics: dict[str, float | torch.Tensor]) -> None:
    """Add one micro-batch's metrics into `totals`; tensors stay on their device (float64), so a step waits for
    the device once (`_host_floats`), not once per micro-batch."""
    for key, value in metrics.items():
        value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
        totals[key] = totals.get(key, 0.0) + value


def _host_floats(totals: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """`totals` as floats, its tensors copied to the host together."""
    keys = [key for key, value in totals.items() if isinstance(value, torch.Tensor)]
    if not keys:
        return dict(totals)
    values = torch.stack([totals[key].reshape(()).to(totals[keys[0]].device) for key in keys]).tolist()
    return {**totals, **dict(zip(keys, values))}


def _unit_rows(units: torch.Tensor, rows_per_unit: int) -> torch.Tensor:
    """The row indices of `units` [U], each unit's rows consecutive and in order: [U * rows_per_unit]."""
    if rows_per_unit == 1:
        return units
    return (units[:, None] * rows_per_unit + torch.arange(rows_per_unit, device=units.device)).reshape(-1)


def _compile_layers(model: torch.nn.Module, dynamic: bool) -> None:
    """torch.compile every decoder layer in place. Layers share one compiled graph (torch inlines module
    parameters as inputs), so 24 layers cost one compile (`dynamic`: for every shape; else per shape until a
    second one makes it dynamic), not 24."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"learner.compile: {type(model).__name__} has no decoder layer list "
                         "(model.get_decoder().layers); drop --learner.compile")
    for layer in layers:
        layer.compile(dynamic=True if dynamic else None)


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
