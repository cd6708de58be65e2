"""Preference pairs for the learner: an interleaved `TrainBatch` and the optimizer steps over it.

Rows are [chosen_0, rejected_0, chosen_1, rejected_1, ...]. The learner's micro-batching moves whole pairs
(`rows_per_unit=2`: it sorts pairs, not rows, by length), so an even micro-batch size keeps every pair in one
micro-batch, chosen first (a preference loss needs both sides of a pair at once); shuffling and mini-batches
here move whole pairs too.
"""
from __future__ import annotations

import torch

from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner
from winnow.types import PreferencePair, TrainBatch


def make_pair_batch(pairs: list[PreferencePair], pad_token_id: int = 0) -> TrainBatch:
    """A TrainBatch of 2 x len(pairs) rows, chosen then rejected for each pair; `rewards` [2P] holds each pair's
    preference probability on both of its rows (for logging)."""
    if not pairs:
        raise ValueError("make_pair_batch got no pairs")
    completions = [c for pair in pairs for c in (pair.chosen, pair.rejected)]
    probability = torch.tensor([pair.probability for pair in pairs for _ in range(2)])
    return make_train_batch(completions, torch.zeros(len(completions)), probability, pad_token_id)


def train_pairs(learner: Learner, batch: TrainBatch, objective) -> dict[str, float]:
    """All optimizer steps of one iteration over a pair batch: `num_epochs` passes, each split into
    `num_mini_batches` mini-batches of whole pairs. Reference logprobs are computed once, before any step.
    Returns the mean of the steps' metrics."""
    config = learner.config
    if config.micro_batch_size % 2:
        raise ValueError(f"learner.micro_batch_size={config.micro_batch_size} is odd: a micro-batch would split a "
                         f"(chosen, rejected) pair; use an even size")
    batch = batch.to(learner.device)
    if objective.needs_reference:
        batch.ref_logprobs = learner.reference_logprobs(batch)
    num_pairs = batch.batch_size // 2
    steps: list[dict[str, float]] = []
    for _ in range(config.num_epochs):
        order = torch.randperm(num_pairs, device=learner.device)
        for pairs in order.chunk(config.num_mini_batches):
            rows = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)  # [2p]: each pair's rows together
            steps.append(learner.train_step(batch.select(rows), objective.loss, rows_per_unit=2))
    return {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}
