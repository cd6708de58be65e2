"""The seam between a loop and the parts it drives: what it asks of the Actor, and of the Learner.

A loop never touches an engine or a model directly; it calls these members. The `local` runtime implements
them in one process (`LocalActor` around an `Engine`, the `Learner` itself); a distributed runtime implements
the same members with remote handles (an actor group of engine replicas, a learner group of ranks), so the
same loop drives both.
"""
from __future__ import annotations

from typing import Iterator, Protocol

from winnow.lazy import lazy_import
from winnow.engines.base import Engine
from winnow.learner.sync import SyncConfig, sync_weights, verify_sync
from winnow.types import Completion, SamplingParams, TrainBatch

torch = lazy_import("torch")


class PolicyLearner(Protocol):
    """What a loop asks of the learner (`winnow.learner.Learner` is the local implementation)."""

    num_steps: int
    """optimizer steps taken so far"""

    @property
    def is_main(self) -> bool:
        """True on the rank that logs, evaluates and writes files."""
        ...

    def shard(self, batch: TrainBatch, rows_per_unit: int = 1) -> TrainBatch:
        """This rank's rows of a batch every rank holds."""
        ...

    def forward_ahead(self, batch: TrainBatch, rows_per_unit: int = 1):
        """Launch the forward of the first micro-batch `train_policy(batch)` will train, before the batch's
        advantages exist; a handle for `train_policy(..., ahead=)`, or None where the learner does not."""
        ...

    def train_policy(self, batch: TrainBatch, loss_fn, needs_reference: bool = False, on_mini_batch=None,
                     rows_per_unit: int = 1, ahead=None) -> dict[str, float]:
        """All optimizer steps of one iteration over `batch`; the mean of their metrics."""
        ...

    def named_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights for the actor (a collective under a sharded strategy; sharded weights gathered in
        `gather_dtype` when given)."""
        ...


class Actor(Protocol):
    """What a loop asks of the actor: an `Engine`'s `generate` (so evaluation takes it as an engine), and the
    weight sync, which a distributed actor group implements as a broadcast to its replicas."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """`params.n` completions per prompt, grouped by prompt (see `Engine.generate`)."""
        ...

    def sync(self, learner: PolicyLearner, config: SyncConfig, probe: list[list[int]], seed: int) -> dict[str, float]:
        """Load the learner's weights (bucketed, timed); with `config.check_sync`, check them on `probe`."""
        ...

    def sleep(self) -> None:
        """Free what memory the engines can while the learner trains."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`."""
        ...


class LocalActor:
    """The actor of the `local` runtime: one engine in the loop's process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self.engine.generate(prompts, params)

    def sync(self, learner, config: SyncConfig, probe: list[list[int]], seed: int) -> dict[str, float]:
        metrics = sync_weights(learner, self.engine, config.bucket_mb)
        if config.check_sync:
            metrics.update(verify_sync(self.engine, learner, probe[: config.num_probe_prompts],
                                       config.check_tolerance, config.probe_max_tokens, seed=seed))
        return metrics

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()
