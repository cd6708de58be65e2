"""The `local` runtime: Actor, Oracle and Learner collocated in one process (CPU or one GPU).

One policy iteration, in named phases, each timed and logged as `time/<phase>`:

    generate → score → advantages → train → sync → (eval) → log

It consumes `prompts_per_iteration` prompts per iteration from an endless shuffled stream, and waits on
nothing but itself: every phase runs to completion before the next starts (on-policy by construction).

Under `torchrun` with a sharded learner (`fsdp2`, `deepspeed`) every rank runs this same loop with its own
engine: the same seeded prompts and sampling, so on CPU every rank draws the same samples (on GPU they may
differ in the last bits; each rank's batch is still on-policy, since all engines hold the same synced
weights). The learner trains each rank on its shard of the batch (`Learner.shard`) with the global
normalisers; the sync is a gather every rank joins. Rank 0 alone evaluates, logs and writes files. This
is the simplest correct design: generation is repeated on every rank rather than split, which costs
generation time, not correctness; splitting it belongs to the Ray runtime.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from winnow.engines.base import Engine
from winnow.eval.accuracy import evaluate_accuracy
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner
from winnow.learner.sync import sync_weights, verify_sync
from winnow.oracles.base import RewardOracle
from winnow.types import Completion, Group, Prompt, TrainBatch


@dataclass
class Counters:
    """Running totals, logged every iteration so curves can use any of them as the x axis."""

    iteration: int = 0
    prompts: int = 0
    samples: int = 0
    generated_tokens: int = 0
    oracle_queries: int = 0
    optimizer_steps: int = 0
    unscored_samples: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {f"counts/{k}": float(v) for k, v in self.__dict__.items() if k != "iteration"}


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class LocalRuntime:
    """Runs policy iteration for an RL objective (GRPO, Dr. GRPO, RLOO, PPO) in one process.

    With a `critic` (PPO: the objective's `needs_critic`), the advantages phase values the batch with the
    critic and turns rewards into per-token GAE advantages, and the train phase steps the critic after each
    policy step, on the same mini-batch."""

    def __init__(self, config, *, engine: Engine, learner: Learner, oracle: RewardOracle, objective,
                 train_stream: Iterator[list[Prompt]], eval_prompts: list[Prompt], logger, run_dir: Path,
                 pad_token_id: int, progress=None, critic: Learner | None = None):
        self.config, self.engine, self.learner, self.oracle = config, engine, learner, oracle
        self.critic = critic
        self.objective, self.train_stream, self.eval_prompts = objective, train_stream, eval_prompts
        self.logger, self.run_dir, self.pad_token_id, self.progress = logger, run_dir, pad_token_id, progress
        self.counters = Counters()
        self.sampling = config.rollout.sampling_params()
        self.history: list[dict[str, float]] = []
        self.probe: list[list[int]] | None = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, float]]:
        """Evaluate, then `num_iterations` policy iterations (evaluating every `eval.every`), then evaluate."""
        timer = PhaseTimer()
        with timer("eval"):
            metrics = self.evaluate()
        self.log(metrics, timer)
        for iteration in range(1, self.config.num_iterations + 1):
            self.step(iteration)
        return self.history

    def step(self, iteration: int) -> dict[str, float]:
        """One policy iteration."""
        self.counters.iteration = iteration
        timer = PhaseTimer()
        prompts = next(self.train_stream)
        with timer("generate"):
            # A fresh seed per iteration, derived from the run's: runs replay exactly, iterations differ.
            self.sampling.seed = self.config.seed * 1_000_003 + iteration
            completions = self.engine.generate([p.token_ids for p in prompts], self.sampling)
        with timer("score"):
            groups, score_metrics = self.score(prompts, completions)
        with timer("advantages"):
            batch, adv_metrics = self.advantages(groups)
        train_metrics: dict[str, float] = {}
        sync_metrics: dict[str, float] = {}
        if batch is not None:
            with timer("train"):
                self.engine.sleep()  # frees the engine's GPU memory for the learner where the backend can
                loss_fn = partial(self.objective.loss, max_tokens=self.config.rollout.max_tokens)
                train_metrics = self.learner.train_policy(
                    self.learner.shard(batch), loss_fn, self.objective.needs_reference,
                    on_mini_batch=self.train_critic if self.critic is not None else None)
                self.counters.optimizer_steps = self.learner.num_steps
            with timer("sync"):
                self.engine.wake()
                sync_metrics = self.sync(prompts)
        eval_metrics = {}
        every, last = self.config.eval.every, self.config.num_iterations
        if iteration == last or (every > 0 and iteration % every == 0):
            with timer("eval"):
                eval_metrics = self.evaluate()
        metrics = {**score_metrics, **adv_metrics, **{f"train/{k}": v for k, v in train_metrics.items()},
                   **sync_metrics, **eval_metrics}
        return self.log(metrics, timer)

    # ------------------------------------------------------------------ phases

    def score(self, prompts: list[Prompt], completions: list[Completion]) -> tuple[list[Group], dict]:
        """Ask the oracle for every completion's reward; group them by prompt."""
        n = self.sampling.n
        repeated = [p for p in prompts for _ in range(n)]
        columns = {key: [p.columns.get(key) for p in repeated] for key in prompts[0].columns}
        result = self.oracle.reward(
            [p.text for p in repeated], [c.text for c in completions], [p.reference for p in repeated], columns
        )
        groups = []
        for i, prompt in enumerate(prompts):
            rows = slice(i * n, (i + 1) * n)
            groups.append(Group(prompt, completions[rows], result.scores[rows],
                                {name: s[rows] for name, s in result.components.items()}))
        self.counters.prompts += len(prompts)
        self.counters.samples += len(completions)
        self.counters.oracle_queries += len(completions)
        self.counters.generated_tokens += sum(c.num_tokens for c in completions)
        self.counters.unscored_samples += result.num_failed
        scored = [s for s in result.scores if s is not None]
        lengths = [c.num_tokens for c in completions]
        metrics = {
            "reward/mean": _mean(scored),
            "reward/std": _std(scored),
            **{f"reward/{name}": _mean([s for s in v if s is not None]) for name, v in result.components.items()},
            "rollout/generated_tokens": float(sum(lengths)),
            "rollout/response_tokens_mean": _mean(lengths),
            "rollout/response_tokens_max": float(max(lengths)),
            "rollout/truncated_fraction": _mean([c.finish_reason == "length" for c in completions]),
            "oracle/unscored": float(result.num_failed),
            **result.metrics,
        }
        return groups, metrics

    def advantages(self, groups: list[Group]):
        """Per-group advantages. Unscored samples leave their group (never trained on as a zero reward).
        Without a critic, the group is the baseline: a group with fewer than two scored samples has none
        and is dropped. With a critic (PPO) every scored sample is kept, and the advantages are per token."""
        has_group_baseline = self.critic is None
        kept_completions, advantages, rewards = [], [], []
        num_uniform = num_small = 0
        for group in groups:
            scored = [(c, r) for c, r in zip(group.completions, group.rewards) if r is not None]
            if len(scored) < (2 if has_group_baseline else 1):
                num_small += 1
                continue
            r = torch.tensor([r for _, r in scored], dtype=torch.float32)
            if bool((r == r[0]).all()):
                num_uniform += 1
                if self.config.rollout.drop_uniform_groups and has_group_baseline:
                    continue
            advantages.append(self.objective.advantages(r, len(scored)))
            rewards.append(r)
            kept_completions.extend(c for c, _ in scored)
        metrics = {"rollout/uniform_groups": float(num_uniform), "rollout/dropped_groups": float(num_small)}
        if not kept_completions:
            return None, {**metrics, "rollout/trained_samples": 0.0}
        adv = torch.cat(advantages)
        batch = make_train_batch(kept_completions, adv, torch.cat(rewards), self.pad_token_id)
        metrics["rollout/trained_samples"] = float(len(kept_completions))
        if self.critic is not None:
            batch, token_metrics = self.token_advantages(batch)
            return batch, {**metrics, **token_metrics}
        metrics.update({"advantage/mean": float(adv.mean()), "advantage/abs_mean": float(adv.abs().mean())})
        return batch, metrics

    def token_advantages(self, batch: TrainBatch) -> tuple[TrainBatch, dict[str, float]]:
        """PPO: value the batch with the critic and let the objective turn rewards into per-token GAE
        advantages and returns. The policy's (and reference's) logprobs are taken here, before any update:
        they shape the KL penalty in the reward and are the clipped ratio's pi_old."""
        batch = batch.to(self.learner.device)
        batch.old_logprobs = self.learner.logprobs(self.learner.model, batch)  # [B, T]
        if self.objective.needs_reference:
            batch.ref_logprobs = self.learner.reference_logprobs(batch)  # [B, T]
        batch.old_values = self.critic.predict(batch)  # [B, T]
        batch.advantages, batch.returns, metrics = self.objective.token_advantages(batch)
        return batch, metrics

    def train_critic(self, mini_batch: TrainBatch) -> dict[str, float]:
        """One critic optimizer step on the policy step's mini-batch; its metrics as `critic/...`."""
        metrics = self.critic.train_step(mini_batch, self.objective.value_loss)
        return {f"critic/{key}": value for key, value in metrics.items()}

    def sync(self, prompts: list[Prompt]) -> dict[str, float]:
        """Send the learner's weights to the engine in buckets; with `sync.check_sync`, check a fixed probe."""
        cfg = self.config.sync
        metrics = sync_weights(self.learner, self.engine, cfg.bucket_mb)
        if cfg.check_sync:
            if self.probe is None:  # fixed for the whole run: held-out prompts, else the first iteration's
                self.probe = [p.token_ids for p in (self.eval_prompts or prompts)[: cfg.num_probe_prompts]]
            metrics.update(verify_sync(self.engine, self.learner, self.probe, cfg.check_tolerance,
                                       cfg.probe_max_tokens, seed=self.config.seed))
        return metrics

    def evaluate(self) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        cfg = self.config.eval
        result = evaluate_accuracy(
            self.engine, self.oracle, self.eval_prompts,
            max_tokens=cfg.max_tokens or self.config.rollout.max_tokens, greedy=cfg.greedy, k=cfg.k,
            temperature=cfg.temperature, correct_threshold=cfg.correct_threshold, seed=self.config.seed,
            stop=list(self.config.rollout.stop),
        )
        samples_dir = self.run_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        with open(samples_dir / f"eval_{self.counters.iteration:05d}.jsonl", "w") as f:
            for row in result.samples:
                f.write(json.dumps(row) + "\n")
        return result.metrics

    # ------------------------------------------------------------------ logging

    def log(self, metrics: dict[str, float], timer: PhaseTimer) -> dict[str, float]:
        total = sum(timer.seconds.values())
        row = {
            **metrics,
            **self.counters.as_metrics(),
            **{f"time/{phase}": s for phase, s in timer.seconds.items()},
            "time/iteration": total,
        }
        if row.get("time/generate") and "rollout/generated_tokens" in row:
            row["throughput/generated_tokens_per_s"] = row["rollout/generated_tokens"] / row["time/generate"]
        self.logger.log(row, step=self.counters.iteration)
        self.history.append(row)
        if self.progress is not None:
            self.progress.update(0 if self.counters.iteration == 0 else 1)
            postfix = {"reward": row.get("reward/mean")}
            for key, value in row.items():
                if key.startswith("eval/") and key.endswith("_accuracy"):
                    postfix[key[5:-9]] = value
            self.progress.set_postfix({k: f"{v:.3f}" for k, v in postfix.items() if v is not None})
        return row


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _std(values) -> float:
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
