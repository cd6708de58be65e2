"""A pairwise preference model: reads the prompt and *both* responses and gives P(a beats b).

The model is an ordinary `num_labels=1` sequence-classification model (any causal LM or encoder) reading one row
per order of the pair: the text pair (prompt, a SEP b), SEP the tokenizer's separator token (its EOS when it has
none). Its logit f(x, a, b) says how much the first response beats the second; the preference is

    P(a beats b) = sigmoid((f(x, a, b) - f(x, b, a)) / temperature)

so P(a beats b) = 1 - P(b beats a) exactly, whatever the weights (the position bias a single order has cancels),
and a response never beats itself (P = 0.5). Training is therefore Bradley-Terry on the two orders: the chosen
"score" of a pair is f(x, chosen, rejected) and the rejected one f(x, rejected, chosen), which is exactly what
`winnow train rm --kind pairwise` trains (`pairwise_texts` builds its rows), so the reward-model family, its loss,
its held-out accuracy and its saving serve both kinds. Why this design rather than averaging two sigmoid
probabilities: the loss, the served arithmetic (`/compare` already returns sigmoid((s_a - s_b) / T) on its two
halves of rows) and the symmetry all come out of one formula, with nothing new to train or serve.

A saved pairwise model carries `winnow_reward_kind = "pairwise"` in its config.json; the scalar reward-model oracle
refuses it and this oracle refuses a model without it, so one kind is never read as the other.
"""
from __future__ import annotations

import time
from typing import Any

from winnow.lazy import lazy_import
from winnow.oracles.preference import bradley_terry
from winnow.oracles.reward_model import KIND_KEY, RewardModelOracle, encode_pairs, load_reward_tokenizer
from winnow.types import PreferenceResult

torch = lazy_import("torch")


def separator(tokenizer: Any) -> str:
    """The text between the two responses: the tokenizer's SEP token, or its EOS (a causal LM has no SEP)."""
    return tokenizer.sep_token or tokenizer.eos_token


def pairwise_texts(tokenizer: Any, firsts: list[str], seconds: list[str]) -> list[str]:
    """The second text of each row's text pair: `first SEP second`."""
    sep = separator(tokenizer)
    return [f"{first}{sep}{second}" for first, second in zip(firsts, seconds)]


def encode_both_orders(tokenizer: Any, prompts: list[str], completions_a: list[str], completions_b: list[str],
                       max_length: int) -> list[list[int]]:
    """Token ids of (prompt, a SEP b) for every pair, then of (prompt, b SEP a): the layout of a compare request's
    rows in the served worker (first half against second half), truncated to `max_length` like `encode_pairs`."""
    return (encode_pairs(tokenizer, prompts, pairwise_texts(tokenizer, completions_a, completions_b), max_length)
            + encode_pairs(tokenizer, prompts, pairwise_texts(tokenizer, completions_b, completions_a), max_length))


def is_pairwise(model_config: Any) -> bool:
    return getattr(model_config, KIND_KEY, None) == "pairwise"


class PairwiseOracle:
    """Compares two responses with a pairwise preference model (a `PreferenceOracle`; it gives no reward)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 32, max_length: int = 512,
                 temperature: float = 1.0, device: str | torch.device = "cpu") -> None:
        self.scorer = RewardModelOracle(model, tokenizer, batch_size=batch_size, max_length=max_length,
                                        temperature=temperature, device=device)
        self.temperature = temperature

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "PairwiseOracle":
        """Load a model saved by `winnow train rm --kind pairwise`; any other model is refused."""
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            tokenizer = load_reward_tokenizer(path)
        except OSError as e:
            raise ValueError(f"cannot load a pairwise model from {path!r} (--oracle.pairwise.path): {e}") from e
        if not is_pairwise(model.config):
            raise ValueError(f"{path} is not a pairwise preference model (its config.json lacks {KIND_KEY}="
                             f"\"pairwise\"): train one with `winnow train rm --kind pairwise`, or serve a scalar "
                             f"reward model with --oracle.kind reward_model")
        return cls(model, tokenizer, **kwargs)

    def logits(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> list[float]:
        """f(x, a, b) - f(x, b, a) per pair: the log-odds that a beats b (at temperature 1)."""
        n = len(prompts)
        if not len(completions_a) == len(completions_b) == n:
            raise ValueError(f"compare got {n} prompts, {len(completions_a)} a and {len(completions_b)} b responses; "
                             f"give one of each per prompt")
        texts = pairwise_texts(self.scorer.tokenizer, completions_a + completions_b, completions_b + completions_a)
        scores = self.scorer.scores(prompts + prompts, texts)
        return [ab - ba for ab, ba in zip(scores[:n], scores[n:])]

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None,
                columns: dict[str, list[Any]] | None = None) -> PreferenceResult:
        start = time.perf_counter()
        probabilities = [bradley_terry(logit, 0.0, self.temperature)
                         for logit in self.logits(prompts, completions_a, completions_b)]
        return PreferenceResult(probabilities, {"pairwise/latency_s": time.perf_counter() - start})

    def close(self) -> None:
        pass


class ServedPairwiseOracle:
    """A pairwise model on an oracle service (`winnow serve-oracle --oracle.kind pairwise`): each comparison is a
    POST /compare, whose reply is the model's P(a beats b) at the service's `compare_temperature`."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None,
                columns: dict[str, list[Any]] | None = None) -> PreferenceResult:
        start = time.perf_counter()
        probabilities = self.client.compare(prompts, completions_a, completions_b, references)
        return PreferenceResult(probabilities, {"pairwise/latency_s": time.perf_counter() - start})

    def close(self) -> None:
        self.client.close()
