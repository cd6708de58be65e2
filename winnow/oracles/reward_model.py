"""A reward model in the actor's process: any `transformers` sequence-classification model.

The model reads (prompt, response) as a text pair, the way reward models are trained (for a causal-LM
backbone the pair is simply concatenated; for BERT-style encoders it gets [SEP] and segment ids). The score is
the single logit of a `num_labels=1` head (the usual reward-model head, Ouyang et al. 2022), or, for a
classifier, the log-odds of its last label against the others. Preferences are Bradley-Terry on the scores.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from winnow.oracles.preference import RewardPreferenceOracle
from winnow.types import PreferenceResult, RewardResult


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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as e:
            raise ValueError(f"cannot load a reward model from {path!r} (--oracle.reward-model.path): {e}") from e
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion), computed `batch_size` pairs at a time."""
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            encoded = self.tokenizer(prompts[rows], completions[rows], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**encoded).logits.float()  # [b, num_labels]
            if logits.shape[-1] == 1:
                score = logits[:, 0]
            else:  # log-odds of the last ("good") label
                score = logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)
            out.extend(score.tolist())
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
