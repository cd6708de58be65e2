"""reasoning-gym's procedurally generated tasks as a prompt source: `--data.train reasoning_gym:NAME`.

`pip install "winnow[reasoning-gym]"`. Nothing downloads: reasoning-gym generates each task's questions from a
seed (`chain_sum`, `basic_arithmetic`, `gsm_symbolic`, `letter_counting`, ... ; 100+ tasks). The train split is
generated from `seed`, the eval split from a seed derived from it, and eval questions that also occur in train
are dropped, so the held-out set is never trained on. Every row carries its reasoning-gym entry (JSON, column
`reasoning_gym_entry`), which the builtin reward `reasoning_gym` hands to the task's own scorer.
"""
from __future__ import annotations

import functools
import json
from typing import Any

PREFIX = "reasoning_gym:"
ENTRY_COLUMN = "reasoning_gym_entry"
_EVAL_SEED_OFFSET = 1_000_003
"""the eval split's seed is the train seed plus this (a large prime, far from any seed a user picks next)"""


def import_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError('reasoning-gym tasks need the package: pip install "winnow[reasoning-gym]" '
                          "(or pip install reasoning-gym)") from error
    return reasoning_gym


class ReasoningGymTask:
    """A reasoning-gym dataset as a `Task`: (question, answer) pairs, plus each row's entry for the scorer."""

    def __init__(self, name: str, seed: int = 0, num_train: int = 4000, num_eval: int = 200,
                 options: dict[str, Any] | None = None):
        self.name, self.seed, self.num_train, self.num_eval = name, seed, num_train, num_eval
        self.options = dict(options or {})
        self._entries: dict[str, dict[str, Any]] = {}

    def _generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        rg = import_reasoning_gym()
        try:
            dataset = rg.create_dataset(self.name, size=size, seed=seed, **self.options)
        except Exception as error:  # an unknown name or option: reasoning-gym's own message, with our flags
            raise ValueError(f"reasoning-gym task {self.name!r} with options {self.options}: {error} "
                             "(fix --data.train reasoning_gym:NAME or --data.task-options)") from error
        return [dataset[i] for i in range(size)]

    @functools.cached_property
    def _train(self) -> list[tuple[str, str]]:
        return self._pairs(self._generate(self.num_train, self.seed))

    @functools.cached_property
    def _eval(self) -> list[tuple[str, str]]:
        seen = {q for q, _ in self._train}
        entries = [e for e in self._generate(self.num_eval, self.seed + _EVAL_SEED_OFFSET) if e["question"] not in seen]
        return self._pairs(entries)

    def _pairs(self, entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
        for entry in entries:
            self._entries[entry["question"]] = entry
        return [(e["question"], str(e["answer"])) for e in entries]

    def examples(self, split: str) -> list[tuple[str, str]]:
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} must be 'train' or 'eval'")
        return list(self._train if split == "train" else self._eval)

    def extra_columns(self, question: str, answer: str) -> dict[str, str]:
        """The row's reasoning-gym entry (JSON), for the `reasoning_gym` reward."""
        return {ENTRY_COLUMN: json.dumps(self._entries[question], default=str)}


def parse_options(text: str | None) -> dict[str, Any]:
    """`--data.task-options` as a dict: a JSON object, e.g. '{"min_terms": 2, "max_terms": 2}'."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--data.task-options {text!r} is not JSON ({error}); write a JSON object, e.g. "
                         "'{\"max_terms\": 2}'") from error
    if not isinstance(options, dict):
        raise ValueError(f"--data.task-options {text!r} must be a JSON object, e.g. '{{\"max_terms\": 2}}'")
    return options
