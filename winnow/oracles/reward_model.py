"""A reward model in the actor's process: any `transformers` sequence-classification model.

The model reads (prompt, response) as a text pair, the way reward models are trained (for a causal-LM
backbone the pair is simply concatenated; for BERT-style encoders it gets [SEP]), as input ids and an attention
mask only: `encode_pairs` is the one tokenisation that `winnow train rm`, this oracle and the served model
(`winnow.oracles.model_service`) share, so a model scores the same wherever it runs. The score is
the single logit of a `num_labels=1` head (the usual reward-model head, Ouyang et al. 2022), or, for a
classifier, the log-odds of its last label against the others. Preferences are Bradley-Terry on the scores.
"""
from __future__ import annotations

import time
from typing import Any

from winnow.lazy import lazy_import, no_grad
from winnow.oracles.preference import RewardPreferenceOracle
from winnow.types import PreferenceResult, RewardResult

torch = lazy_import("torch")

KIND_KEY = "winnow_reward_kind"
"""the config.json key saying which kind of reward model a directory holds ("pairwise"; absent: scalar)"""


class RewardModelOracle:
    """Scores responses with a sequence-classification model; a `RewardOracle` and a `PreferenceOracle`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 32, max_length: int = 512,
                 temperature: float = 1.0, device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"reward model batch_size={batch_size} must be >= 1")
        if tokenizer.pad_token_id is None:
            # Padding is masked; a causal-LM head finds the last real token through config.pad_token_id.
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size, self.max_length, self.device = batch_size, max_length, torch.device(device)
        self.temperature = temperature
        self._preference = RewardPreferenceOracle(self, temperature)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "RewardModelOracle":
        """Load a model and tokenizer saved with `save_pretrained` (or a hub id, where a hub is reachable)."""
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            tokenizer = load_reward_tokenizer(path)
        except OSError as e:
            raise ValueError(f"cannot load a reward model from {path!r} (--oracle.reward-model.path): {e}") from e
        if getattr(model.config, KIND_KEY, None) == "pairwise":
            raise ValueError(f"{path} is a pairwise preference model (it reads both responses and only compares): "
                             f"use --oracle.kind pairwise --oracle.pairwise.path {path}")
        return cls(model, tokenizer, **kwargs)

    def scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion), computed `batch_size` pairs at a time."""
        rows = encode_pairs(self.tokenizer, prompts, completions, self.max_length)
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            out.extend(score_ids(self.model, rows[start:start + self.batch_size], self.tokenizer.pad_token_id,
                                 self.device))
        return out

    def reward(self, prompts: list[str], completions: list[str], references: list[str | None],
               columns: dict[str, list[Any]] | None = None) -> RewardResult:
        start = time.perf_counter()
        scores = self.scores(prompts, completions)
        return RewardResult(list(scores), {"reward_model": list(scores)},
                            {"reward_model/latency_s": time.perf_counter() - start})

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None,
                columns: dict[str, list[Any]] | None = None) -> PreferenceResult:
        return self._preference.compare(prompts, completions_a, completions_b, references, columns)

    def close(self) -> None:
        pass


def encode_pairs(tokenizer: Any, prompts: list[str], completions: list[str], max_length: int) -> list[list[int]]:
    """The token ids of each (prompt, completion) text pair, truncated to `max_length` (longest side first)."""
    return tokenizer(prompts, completions, truncation=True, max_length=max_length)["input_ids"]


@no_grad
def score_ids(model: torch.nn.Module, rows: list[list[int]], pad_token_id: int, device: torch.device | str,
              length: int | None = None) -> list[float]:
    """Scores of right-padded `rows` (to `length`, default the longest) in one forward: the single logit of a
    `num_labels=1` head, or a classifier's log-odds of its last ("good") label against the others."""
    length = length or max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()  # [b, L]
    if logits.shape[-1] == 1:
        score = logits[:, 0]
    else:
        score = logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)
    return score.tolist()


def load_reward_tokenizer(path: str) -> Any:
    """The tokenizer saved beside a reward model; EOS pads when it has no padding token (padding is masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
