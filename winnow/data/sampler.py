"""Shuffled prompt batches, epoch after epoch, reproducible from a seed and resumable from a count."""
from __future__ import annotations

import random
from typing import Generic, Iterator, Sequence, TypeVar

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """An endless iterator of shuffled batches.

    Epoch e visits the items in the order `random.Random(f"{seed}:{e}")` shuffles them to; batches are
    consecutive slices of epoch 0, then epoch 1, ... So every item is used exactly once per epoch, no item is
    ever skipped, and a batch at an epoch boundary holds the end of one epoch and the start of the next. The
    whole state is `num_consumed`, so `state_dict()` / `load_state_dict()` resume mid-epoch exactly.
    """

    def __init__(self, items: Sequence[T], batch_size: int, seed: int = 0) -> None:
        if not items:
            raise ValueError("PromptSampler needs at least one item")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.num_consumed = 0
        """items handed out so far, over all epochs"""
        self._cached_epoch = -1
        self._cached_order: list[int] = []

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.num_consumed // len(self.items)

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        num_items = len(self.items)
        batch: list[T] = []
        while len(batch) < self.batch_size:
            epoch, offset = divmod(self.num_consumed, num_items)
            take = min(self.batch_size - len(batch), num_items - offset)
            batch.extend(self.items[i] for i in self._order(epoch)[offset : offset + take])
            self.num_consumed += take
        return batch

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            self._cached_order = list(range(len(self.items)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._cached_order)
            self._cached_epoch = epoch
        return self._cached_order

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "num_items": len(self.items), "num_consumed": self.num_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["num_items"]) != (self.seed, len(self.items)):
            raise ValueError(
                f"sampler state is for seed={state['seed']} over {state['num_items']} items, but this sampler has "
                f"seed={self.seed} over {len(self.items)}: the data or its config changed since the checkpoint"
            )
        self.num_consumed = state["num_consumed"]


def batches(items: Sequence[T], batch_size: int, seed: int = 0) -> Iterator[list[T]]:
    """Endless shuffled batches of `items`; see `PromptSampler`."""
    return PromptSampler(items, batch_size, seed)
