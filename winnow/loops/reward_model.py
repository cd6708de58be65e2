"""The reward-model family (`winnow train rm`): one optimizer step per iteration on a batch of dataset pairs.

Rows of a batch are [chosen_0, rejected_0, chosen_1, rejected_1, ...] (each a whole (prompt, response) text
pair, tokenised the way the reward-model oracle reads it); the learner keeps a pair's two rows together
(`rows_per_unit=2`). Its forward is `sequence_scores`: one score per row. Held-out pairs are scored without
gradients: `eval/pair_loss`, `eval/pair_accuracy` (fraction of pairs whose chosen response scores higher) and
`eval/reward_margin` (mean r_chosen - r_rejected).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from winnow.lazy import lazy_import
from winnow.algorithms.reward_model import bradley_terry_loss
from winnow.eval.accuracy import EvalResult
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner
from winnow.loops.base import Counters, PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.types import Completion, TrainBatch

torch = lazy_import("torch")

ScoredPair = tuple[list[int], list[int], float]
"""(chosen ids, rejected ids, margin): each side the whole (prompt, response) as the reward model reads it"""


@dataclass
class RewardModelCounters(Counters):
    """Counters plus the dataset pairs trained on so far."""

    pairs: int = 0


def make_score_batch(pairs: list[ScoredPair], pad_token_id: int) -> TrainBatch:
    """2 x len(pairs) right-padded rows [chosen_0, rejected_0, ...]; `rewards` [2P] holds each pair's margin on
    both of its rows. The whole row is the "response" (a reward model reads all of it)."""
    rows = [Completion([], ids, [0.0] * len(ids), "stop", "") for chosen, rejected, _ in pairs
            for ids in (chosen, rejected)]
    margins = torch.tensor([m for _, _, m in pairs for _ in range(2)], dtype=torch.float32)
    return make_train_batch(rows, rewards=margins, pad_token_id=pad_token_id)


def sequence_scores(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """The reward model's score of each row, float32, repeated along the row: `[B, T]` as the learner's forward
    contract asks (column 0 is read). A causal-LM head pools the last non-pad token (the model's
    `config.pad_token_id`), an encoder its first token: `transformers` does it, as it will when serving."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, 1]
    return logits[:, :1].float().expand(-1, batch.input_ids.shape[1])  # [B, T]


def pair_loss(centring_coef: float):
    """The learner's loss function over a micro-batch of pairs: the Bradley-Terry loss of its pairs, weighted
    by their share of the mini-batch's pairs so that micro-batch losses and metrics add up to the mini-batch's."""

    def loss_fn(outputs: torch.Tensor, micro: TrainBatch, *, num_sequences: int, num_tokens: float):
        scores = outputs[:, 0]  # [b]
        margin = micro.rewards[0::2] if micro.rewards is not None else None
        loss, metrics = bradley_terry_loss(scores[0::2], scores[1::2], margin=margin, centring_coef=centring_coef)
        share = scores.shape[0] / num_sequences
        return loss * share, {k: v * share for k, v in metrics.items()}

    return loss_fn


class RewardModelFamily:
    """Reward-model training on dataset pairs, evaluated by held-out pair accuracy and margin."""

    def __init__(self, *, learner: Learner, pairs: Iterator[list[ScoredPair]], eval_pairs: list[ScoredPair],
                 centring_coef: float, pad_token_id: int):
        self.learner, self.pairs, self.pad_token_id = learner, pairs, pad_token_id
        self.loss_fn = pair_loss(centring_coef)
        self.centring_coef = centring_coef
        self.eval_batch = make_score_batch(eval_pairs, pad_token_id) if eval_pairs else None
        self.counters = RewardModelCounters()

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        pairs = next(self.pairs)
        self.counters.pairs += len(pairs)
        return make_score_batch(pairs, self.pad_token_id), {}

    def train(self, batch: TrainBatch) -> dict[str, float]:
        return self.learner.train_policy(self.learner.shard(batch, rows_per_unit=2), self.loss_fn, rows_per_unit=2)

    def state_dict(self) -> dict:
        """Counters and the pair stream's position (what a resumed run's next iteration depends on)."""
        return {"counters": counters_state(self.counters), "pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.pairs.load_state_dict(state["pairs"])

    def evaluate(self) -> EvalResult:
        if self.eval_batch is None:
            return EvalResult({}, [])
        batch = self.eval_batch.to(self.learner.device)
        scores = self.learner.predict(batch)[:, 0]  # [2P]
        loss, metrics = bradley_terry_loss(scores[0::2], scores[1::2], margin=batch.rewards[0::2],
                                           centring_coef=self.centring_coef)
        return EvalResult({"eval/pair_loss": float(loss), "eval/pair_accuracy": metrics["rm/accuracy"],
                           "eval/reward_margin": metrics["rm/margin"], "eval/score_mean": metrics["rm/score_mean"]},
                          [])
