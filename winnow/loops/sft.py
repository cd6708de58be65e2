"""The supervised fine-tuning family: each iteration is one optimizer step on `batch_size` (prompt, completion)
pairs drawn from an endless shuffled stream; the loss is the completion tokens' NLL (`sft_loss`)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from winnow.algorithms.sft import sft_loss
from winnow.engines.base import Engine
from winnow.eval.accuracy import EvalResult, evaluate_accuracy
from winnow.learner.batch import make_sft_batch
from winnow.learner.learner import Learner
from winnow.loops.base import Counters, PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.config import EvalConfig
from winnow.oracles.base import RewardOracle
from winnow.types import Prompt, TrainBatch


@dataclass
class SFTCounters(Counters):
    """Counters plus the sequences trained on so far."""

    samples: int = 0


class SFTFamily:
    """Supervised fine-tuning, evaluated by held-out accuracy through an oracle (its first reward verifies)."""

    def __init__(self, *, learner: Learner, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                 oracle: RewardOracle, eval_prompts: list[Prompt], eval_config: EvalConfig, max_tokens: int,
                 eval_engine: Callable[[], Engine], seed: int, pad_token_id: int):
        self.learner, self.pairs, self.batch_size = learner, pairs, batch_size
        self.oracle, self.eval_prompts, self.eval_config, self.max_tokens = oracle, eval_prompts, eval_config, max_tokens
        self.eval_engine, self.seed, self.pad_token_id = eval_engine, seed, pad_token_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.counters = SFTCounters()

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        if len(self.order) < self.batch_size:  # a fresh permutation of the data when this one runs out
            self.order += self.rng.sample(range(len(self.pairs)), len(self.pairs))
        rows, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        self.counters.samples += len(rows)
        return make_sft_batch([self.pairs[i] for i in rows], self.pad_token_id), {}

    def train(self, batch: TrainBatch) -> dict[str, float]:
        return self.learner.train_step(batch.to(self.learner.device), sft_loss)

    def state_dict(self) -> dict:
        """Counters and the data stream's position: the shuffling rng and what is left of this permutation."""
        return {"counters": counters_state(self.counters), "rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

    def evaluate(self) -> EvalResult:
        if not self.eval_prompts:
            return EvalResult({}, [])
        cfg = self.eval_config
        return evaluate_accuracy(self.eval_engine(), self.oracle, self.eval_prompts, max_tokens=self.max_tokens,
                                 greedy=cfg.greedy, k=cfg.k, temperature=cfg.temperature,
                                 correct_threshold=cfg.correct_threshold, seed=self.seed)
