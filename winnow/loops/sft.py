"""The supervised fine-tuning family: each iteration is one optimizer step on `batch_size` examples drawn from an
endless shuffled stream; the loss is the NLL of the target tokens (`sft_loss`): a completion, or a conversation's
assistant turns. Held-out: accuracy through an oracle, and for chat data the held-out conversations' loss and
assistant-token accuracy."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from winnow.algorithms.sft import sft_loss
from winnow.engines.base import Engine
from winnow.eval.accuracy import EvalResult, evaluate_accuracy
from winnow.lazy import lazy_function
from winnow.learner.learner import Learner
from winnow.loops.base import Counters, PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.config import EvalConfig
from winnow.oracles.base import RewardOracle
from winnow.types import Prompt, TrainBatch

token_accuracy = lazy_function("winnow.learner.logprobs", "token_accuracy")  # its module needs torch


@dataclass
class SFTCounters(Counters):
    """Counters plus the sequences (examples: pairs or conversations) and target tokens trained on so far."""

    samples: int = 0
    target_tokens: int = 0


class SFTFamily:
    """Supervised fine-tuning, evaluated by held-out accuracy through an oracle (its first reward verifies) and,
    when `heldout` is given, by the held-out target tokens' loss and accuracy (`eval/heldout_loss`,
    `eval/assistant_token_accuracy`; every rank computes them, as sharded forwards need)."""

    def __init__(self, *, learner: Learner, examples: list[Any], make_batch: Callable[[list[Any]], TrainBatch],
                 batch_size: int, oracle: RewardOracle, eval_prompts: list[Prompt], eval_config: EvalConfig,
                 max_tokens: int, eval_engine: Callable[[], Engine], seed: int, heldout: TrainBatch | None = None):
        self.learner, self.examples, self.make_batch, self.batch_size = learner, examples, make_batch, batch_size
        self.oracle, self.eval_prompts, self.eval_config, self.max_tokens = oracle, eval_prompts, eval_config, max_tokens
        self.eval_engine, self.seed, self.heldout = eval_engine, seed, heldout
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.counters = SFTCounters()

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        if len(self.order) < self.batch_size:  # a fresh permutation of the data when this one runs out
            self.order += self.rng.sample(range(len(self.examples)), len(self.examples))
        rows, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        batch = self.make_batch([self.examples[i] for i in rows])
        self.counters.samples += len(rows)
        self.counters.target_tokens += batch.num_response_tokens
        metrics = {"data/rows": float(batch.batch_size),
                   "data/fill": float(batch.attention_mask.float().mean())}  # real tokens / row slots (packing)
        return batch, metrics

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step. Every rank drew the same batch (the same seeded stream); each trains its share of
        the rows (`Learner.shard`), and the loss's token count is all-reduced, so the step is the one a single
        process takes on the whole batch."""
        return self.learner.train_step(self.learner.shard(batch).to(self.learner.device), sft_loss)

    def state_dict(self) -> dict:
        """Counters and the data stream's position: the shuffling rng and what is left of this permutation."""
        return {"counters": counters_state(self.counters), "rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

    def evaluate(self) -> EvalResult:
        metrics: dict[str, float] = {}
        if self.heldout is not None:
            batch = self.heldout.to(self.learner.device)
            num_tokens = max(batch.num_response_tokens, 1)
            logprobs = self.learner.logprobs(self.learner.model, batch)  # [B, T], 0 off the mask
            metrics["eval/heldout_loss"] = float(-(logprobs * batch.response_mask).sum()) / num_tokens
            correct = self.learner.evaluate_tokens(batch, token_accuracy)  # [B, T]
            metrics["eval/assistant_token_accuracy"] = float(correct.sum()) / num_tokens
        engine = self.eval_engine()  # on every rank: a sharded learner gathers its weights for the engine collectively
        if not self.eval_prompts:
            return EvalResult(metrics, [])
        cfg = self.eval_config
        result = evaluate_accuracy(engine, self.oracle, self.eval_prompts, max_tokens=self.max_tokens,
                                   greedy=cfg.greedy, k=cfg.k, temperature=cfg.temperature,
                                   correct_threshold=cfg.correct_threshold, seed=self.seed)
        return EvalResult({**metrics, **result.metrics}, result.samples)
