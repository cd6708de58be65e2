"""One loop skeleton for every training family: counters, a phase timer, the eval schedule, the log row, the
progress bar, and the weight sync (actor asleep while the learner trains, woken and synced after, checked with
`--sync.check-sync`). What differs between families is their `Family`: how a batch is collected and trained,
and how the policy is evaluated.

One iteration, each phase timed as `time/<phase>`:

    batch, metrics = family.collect(iteration, timer)   # RL: generate → score → advantages (the actor asleep
                                                        # from scoring on, the learner's first forward running)
                                                        # online preference: generate → judge
                                                        # offline preference, SFT: the next dataset batch
    family.train(batch)                                 # optimizer steps, the actor asleep        (train)
    actor.sync(learner)                                 # bucketed weights, optionally checked     (sync)
    family.evaluate()                                   # at 0, every `eval_every`, at the end     (eval)
    log(metrics, counters, times)
    checkpoint                                          # every `--checkpoint.every`, and on a signal

With a `Checkpointer` the loop saves the whole run state every `checkpoint.every` iterations, and on SIGINT or
SIGTERM finishes the current iteration, saves, and exits with the command that resumes. A resumed loop
restores the checkpoint, hands its weights to the actor before the first generate, and continues at the next
iteration (no second evaluation at the start).

Consumes one batch of the family's stream per iteration and waits on nothing but itself: every phase runs
to completion before the next starts (on-policy by construction).
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from winnow.lazy import lazy_import
from winnow.eval.accuracy import EvalResult
from winnow.learner.sync import SyncConfig
from winnow.loops.checkpoint import Checkpointer, StopRequest, agreed_signal
from winnow.loops.seam import Actor, PolicyLearner
from winnow.types import TrainBatch

torch = lazy_import("torch")


@dataclass
class Counters:
    """Running totals, logged every iteration as `counts/<name>` so curves can use any of them as the x axis.
    Families add their own fields (prompts, samples, oracle queries, pairs, ...)."""

    iteration: int = 0
    optimizer_steps: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {f"counts/{k}": float(v) for k, v in self.__dict__.items() if k != "iteration"}


@dataclass
class PhaseTimer:
    """Seconds per named phase of one iteration (CUDA work finished before the clock stops)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class Family(Protocol):
    """A training family's part of an iteration (RL, online preference, offline preference, SFT)."""

    counters: Counters
    """the family's running totals; the loop sets `iteration` and `optimizer_steps`"""

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        """This iteration's training batch (None: nothing to train on) and its metrics, timing its phases."""
        ...

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """The iteration's optimizer steps on `batch`; their metrics (logged under `train/`)."""
        ...

    def evaluate(self) -> EvalResult:
        """Held-out numbers (`eval/...`) and a few samples to keep; empty on ranks that do not evaluate."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the next iteration depends on besides the learners: counters, the data stream's position,
        the pair selector's state (saved in checkpoints)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s state."""
        ...


class Loop:
    """Runs a family for `num_iterations` iterations: evaluate, iterate, evaluate.

    `actor` is None for families that never sample (offline preference); then nothing is synced. Under
    torchrun every rank runs the same loop; the logger of ranks other than 0 writes nothing.
    """

    def __init__(self, family: Family, *, learner: PolicyLearner, actor: Actor | None, num_iterations: int,
                 eval_every: int, sync: SyncConfig | None = None, probe: list[list[int]] | None = None,
                 seed: int = 0, logger: Any, run_dir: Path, progress=None, checkpointer: Checkpointer | None = None,
                 max_idle_iterations: int = 5):
        self.family, self.learner, self.actor = family, learner, actor
        self.num_iterations, self.eval_every = num_iterations, eval_every
        self.sync_config, self.probe, self.seed = sync or SyncConfig(), probe or [], seed
        self.logger, self.run_dir, self.progress = logger, run_dir, progress
        self.checkpointer = checkpointer
        self.max_idle_iterations = max_idle_iterations
        self.history: list[dict[str, float]] = []
        self.num_idle_in_a_row = 0
        self.num_trained_iterations = 0

    @property
    def counters(self) -> Counters:
        return self.family.counters

    def run(self) -> list[dict[str, float]]:
        """Evaluate, then `num_iterations` iterations (evaluating every `eval_every`), then evaluate. A resumed
        loop starts after its checkpoint's iteration instead."""
        start = self.resume() if self.checkpointer and self.checkpointer.resume_from else 0
        if start == 0:
            timer = PhaseTimer()
            with timer("eval"):
                metrics = self.evaluate()
            self.log(metrics, timer)
        with StopRequest() as stop:
            for iteration in range(start + 1, self.num_iterations + 1):
                self.step(iteration)
                signum = agreed_signal(stop.signum)
                if self.checkpointer is not None and (self.checkpointer.should_save(iteration) or signum):
                    self.checkpointer.save(iteration, self.family)
                if signum is not None:
                    self.interrupted(iteration, signum)
        if self.num_iterations > start and self.num_trained_iterations == 0:
            raise NothingTrainedError(f"no iteration of {self.num_iterations - start} trained anything: "
                                      f"{self._idle_reason()}")
        return self.history

    def resume(self) -> int:
        """Restore the checkpoint; the actor gets its weights before the first generate. Returns its iteration."""
        start = self.checkpointer.restore(self.family)
        self.counters.iteration, self.counters.optimizer_steps = start, self.learner.num_steps
        if self.actor is not None:
            self.actor.sync(self.learner, self.sync_config, self.probe, self.seed)
        if self.progress is not None:
            self.progress.update(start)
        return start

    def interrupted(self, iteration: int, signum: int) -> None:
        """Exit after a signal: the checkpoint is written, say how to resume (exit status 128 + signal)."""
        if self.checkpointer is None:
            message = f"winnow: stopped after iteration {iteration} (no checkpoint: this run has no run directory)"
        else:
            message = (f"winnow: stopped after iteration {iteration}; checkpoint {self.checkpointer.last_saved}\n"
                       f"resume with: {self.checkpointer.resume_command}")
        if self.learner.is_main:
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def step(self, iteration: int) -> dict[str, float]:
        """One iteration: collect, train, sync, maybe evaluate, log."""
        self.counters.iteration = iteration
        timer = PhaseTimer()
        compiled_before = compile_seconds()
        batch, metrics = self.family.collect(iteration, timer)
        self._check_idle(batch)
        if batch is not None:
            with timer("train"):
                if self.actor is not None:
                    self.actor.sleep()  # frees the engine's GPU memory for the learner where the backend can
                metrics.update({f"train/{k}": v for k, v in self.family.train(batch).items()})
                self.counters.optimizer_steps = self.learner.num_steps
            if self.actor is not None:
                with timer("sync"):
                    self.actor.wake()
                    metrics.update(self.actor.sync(self.learner, self.sync_config, self.probe, self.seed))
        elif self.actor is not None:
            self.actor.wake()  # nothing to train, but a family may have let the actor sleep while it scored
        if iteration == self.num_iterations or (self.eval_every > 0 and iteration % self.eval_every == 0):
            with timer("eval"):
                metrics.update(self.evaluate())
        compiled = compile_seconds() - compiled_before
        if compiled > 0:  # inside the phases' times, not added to them
            metrics["time/compile"] = compiled
        return self.log(metrics, timer)

    def _check_idle(self, batch: TrainBatch | None) -> None:
        """Count iterations whose batch carries no reward signal (none at all, or only zero advantages: the
        family says why in `idle_reason`); `max_idle_iterations` in a row stop the run with that reason."""
        if batch is not None and not getattr(self.family, "idle_reason", ""):
            self.num_idle_in_a_row = 0
            self.num_trained_iterations += 1
            return
        self.num_idle_in_a_row += 1
        if self.num_idle_in_a_row >= self.max_idle_iterations:
            raise NothingTrainedError(f"{self.num_idle_in_a_row} iterations in a row trained nothing: "
                                      f"{self._idle_reason()} (--rollout.max-idle-iterations allows more)")

    def _idle_reason(self) -> str:
        return getattr(self.family, "idle_reason", "") or "no batch had anything to train on"

    def evaluate(self) -> dict[str, float]:
        """The family's evaluation; its samples go to RUN_DIR/samples/eval_<iteration>.jsonl."""
        result = self.family.evaluate()
        if result.samples:
            samples_dir = self.run_dir / "samples"
            samples_dir.mkdir(parents=True, exist_ok=True)
            with open(samples_dir / f"eval_{self.counters.iteration:05d}.jsonl", "w") as f:
                for row in result.samples:
                    f.write(json.dumps(row) + "\n")
        return result.metrics

    def log(self, metrics: dict[str, float], timer: PhaseTimer) -> dict[str, float]:
        """One row per iteration: the metrics, the counters, seconds per phase, and generation throughput."""
        row = {
            **metrics,
            **self.counters.as_metrics(),
            **{f"time/{phase}": s for phase, s in timer.seconds.items()},
            "time/iteration": sum(timer.seconds.values()),
        }
        if row.get("time/generate") and "rollout/generated_tokens" in row:
            row["throughput/generated_tokens_per_s"] = row["rollout/generated_tokens"] / row["time/generate"]
        self.logger.log(row, step=self.counters.iteration)
        self.history.append(row)
        if self.progress is not None:
            self.progress.update(0 if self.counters.iteration == 0 else 1)
            self.progress.set_postfix({_short(k): f"{v:.3f}" for k, v in row.items() if _is_shown(k) and v == v})
            if self.progress.disable and self.learner.is_main:  # no bar (stderr is a file): one line each
                print(self.line(row), flush=True)
        return row

    def line(self, row: dict[str, float]) -> str:
        """The iteration's one-line summary for a log file: its number, then reward, loss and eval numbers."""
        names = {"reward/mean": "reward", "train/loss": "loss"}
        shown = "  ".join(f"{names.get(k) or _short(k)} {v:.4g}" for k, v in row.items() if _is_shown(k))
        return f"iteration {self.counters.iteration}/{self.num_iterations}  {shown}".rstrip()


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far: tracing and building the forward graphs' kernels,
    and the backward graphs' (built at their first backward). 0 where torch does not keep the figures."""
    utils = sys.modules.get("torch._dynamo.utils")  # never imported: nothing was compiled
    metrics = getattr(utils, "compilation_time_metrics", {})
    return sum(sum(metrics.get(key, ())) for key in _COMPILE_TIMERS)


_COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


class NothingTrainedError(RuntimeError):
    """The run trained nothing for `max_idle_iterations` iterations in a row, or at all; the message says why."""


def _is_shown(key: str) -> bool:
    """The few numbers worth a place on the progress bar."""
    return key in ("reward/mean", "train/loss", "eval/win_rate", "episode/success_rate") or (
        key.startswith("eval/") and key.endswith("_accuracy"))


def _short(key: str) -> str:
    name = key.split("/", 1)[1]
    return name[: -len("_accuracy")] if name.endswith("_accuracy") else name
