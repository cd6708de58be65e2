"""The offline preference family (plain DPO and friends) on a `{prompt, chosen, rejected}` dataset.

Each iteration trains on the next batch of dataset pairs from an endless shuffled stream; no engine samples
and no oracle is queried (the labels are the dataset's). Held-out pairs are scored without gradients:
`eval/pair_loss`, `eval/reward_accuracy` (fraction of pairs whose implicit reward prefers the chosen
response) and `eval/reward_margin`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from winnow.lazy import lazy_import, no_grad
from winnow.eval.accuracy import EvalResult
from winnow.learner.batch import make_pair_batch
from winnow.learner.learner import Learner
from winnow.loops.base import Counters, PhaseTimer
from winnow.loops.checkpoint import counters_state, load_counters
from winnow.loops.preference import train_pairs
from winnow.types import Completion, PreferencePair, Prompt, TrainBatch

torch = lazy_import("torch")


@dataclass
class OfflineCounters(Counters):
    """Counters plus the dataset pairs trained on so far."""

    pairs: int = 0


class OfflinePreferenceFamily:
    """Preference optimisation on dataset pairs."""

    def __init__(self, *, learner: Learner, objective, pairs: Iterator[list[PreferencePair]],
                 eval_pairs: list[PreferencePair], pad_token_id: int):
        self.learner, self.objective, self.pairs = learner, objective, pairs
        self.eval_batch = make_pair_batch(eval_pairs, pad_token_id) if eval_pairs else None
        self.pad_token_id = pad_token_id
        self.counters = OfflineCounters()

    def collect(self, iteration: int, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        pairs = next(self.pairs)
        self.counters.pairs += len(pairs)
        return make_pair_batch(pairs, self.pad_token_id), {}

    def train(self, batch: TrainBatch) -> dict[str, float]:
        return train_pairs(self.learner, batch, self.objective)

    def state_dict(self) -> dict:
        return {"counters": counters_state(self.counters), "pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_counters(self.counters, state["counters"])
        self.pairs.load_state_dict(state["pairs"])

    def evaluate(self) -> EvalResult:
        if self.eval_batch is None:
            return EvalResult({}, [])
        return EvalResult(evaluate_pairs(self.learner, self.eval_batch, self.objective), [])


def dataset_pairs(prompts: list[Prompt], tokenizer, source: str) -> list[PreferencePair]:
    """Pairs from prompts whose rows have `chosen` and `rejected` columns (non-empty strings); EOS is appended
    to both responses, as SFT does, so the policy learns where a preferred answer ends."""
    pairs = []
    for p in prompts:
        sides = []
        for column in ("chosen", "rejected"):
            text = p.columns.get(column)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{source}, row {p.index}: {column!r} must be a non-empty string, got {text!r}; "
                                 f"offline preference data has rows {{\"prompt\": ..., \"chosen\": ..., "
                                 f"\"rejected\": ...}}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sides.append(Completion(p.token_ids, ids, [0.0] * len(ids), "stop", text))
        pairs.append(PreferencePair(p, sides[0], sides[1]))
    return pairs


@no_grad
def evaluate_pairs(learner: Learner, batch: TrainBatch, objective) -> dict[str, float]:
    """The objective's loss and implicit-reward metrics on held-out pairs, without gradients."""
    batch = batch.to(learner.device)
    if objective.needs_reference:
        batch.ref_logprobs = learner.reference_logprobs(batch)
    logprobs = learner.logprobs(learner.model, batch)
    loss, metrics = objective.loss(logprobs, batch, num_sequences=batch.batch_size,
                                   num_tokens=max(batch.num_response_tokens, 1))
    return {"eval/pair_loss": float(loss), "eval/reward_accuracy": float(metrics["pref/reward_accuracy"]),
            "eval/reward_margin": float(metrics["pref/reward_margin"])}
