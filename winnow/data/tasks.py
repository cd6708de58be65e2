"""Built-in verifiable tasks that need no download: multi-digit arithmetic.

A task yields `(question, answer)` pairs for a "train" and an "eval" split. The answer is the exact string a
correct response contains, so an exact-match reward can score it. The arithmetic task is the one the CPU
calibration in ENVIRONMENT.md uses: 2-digit addition, a character tokenizer and a ~0.5M-parameter model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Literal, Protocol

Split = Literal["train", "eval"]

_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
_ENUMERATE_LIMIT = 200_000
"""question spaces up to this size are enumerated and shuffled; larger ones are sampled with rejection"""


class Task(Protocol):
    """A source of verifiable (question, answer) pairs."""

    def examples(self, split: Split) -> list[tuple[str, str]]:
        """The split's (question, answer) pairs, in a fixed order."""
        ...


class ArithmeticTask:
    """`a<op>b=` questions with exact integer answers: "12+34=" -> "46" (no spaces; "-" answers may be negative).

    Operands have exactly `num_digits` digits (0-9 for one digit). The split is decided per question by a hash
    of (seed, question): a question is held out for eval iff its hash falls below `eval_fraction`. Train and
    eval therefore never share a question, whatever their sizes, and the held-out set does not move when
    `num_train` changes. Within each side, questions are drawn without replacement by a seeded RNG.
    """

    def __init__(
        self,
        num_digits: int = 2,
        ops: str = "+",
        seed: int = 0,
        num_train: int = 4000,
        num_eval: int = 200,
        eval_fraction: float = 0.1,
        reference_offset: int | None = None,
    ) -> None:
        if num_digits < 1:
            raise ValueError(f"num_digits={num_digits} must be >= 1")
        if not ops or set(ops) - set(_OPERATIONS):
            raise ValueError(f"ops={ops!r} must be a non-empty string of {''.join(_OPERATIONS)!r}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
        self.num_digits = num_digits
        self.ops = "".join(dict.fromkeys(ops))  # drop repeats, keep order
        self.seed = seed
        self.num_train = num_train
        self.num_eval = num_eval
        self.eval_fraction = eval_fraction
        self.reference_offset = reference_offset
        """when set, every row also carries a `reference_response`: the answer plus this offset (a fixed,
        mediocre response for win rates; see `extra_columns`)"""
        self._low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
        self._num_operands = 10**num_digits - self._low
        self.num_questions = len(self.ops) * self._num_operands**2
        """how many distinct questions exist (both splits together)"""

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(num_digits={self.num_digits}, ops={self.ops!r}, seed={self.seed}, "
            f"num_train={self.num_train}, num_eval={self.num_eval})"
        )

    @staticmethod
    def answer(question: str) -> str:
        """The exact answer to a question of this task: "12+34=" -> "46"."""
        body = question.removesuffix("=")
        for i, char in enumerate(body[1:], start=1):  # start at 1: the first operand is never negative
            if char in _OPERATIONS:
                return str(_OPERATIONS[char](int(body[:i]), int(body[i + 1 :])))
        raise ValueError(f"not an arithmetic question: {question!r}")

    def extra_columns(self, question: str, answer: str) -> dict[str, str]:
        """Columns beyond prompt and answer for the row of `question`: the `reference_response` that a preference
        task's win rate compares the policy with (the answer off by `reference_offset`), or none."""
        if self.reference_offset is None:
            return {}
        return {"reference_response": str(int(answer) + self.reference_offset)}

    def is_held_out(self, question: str) -> bool:
        """Whether `question` belongs to the eval split (for this task's seed)."""
        digest = hashlib.blake2b(f"{self.seed}:{question}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.eval_fraction

    def examples(self, split: Split) -> list[tuple[str, str]]:
        if split == "train":
            return list(self._train)
        if split == "eval":
            return list(self._eval)
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")

    def sft_examples(self, num_examples: int | None = None) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for a supervised warm start, drawn from the train split (never from eval).

        The completion is the bare answer: the SFT loop appends the tokenizer's EOS so the model learns to stop.
        """
        pairs = self.examples("train")
        return pairs if num_examples is None else pairs[:num_examples]

    def to_jsonl(self, path: str | Path, split: Split = "train") -> Path:
        """Write a split as JSON lines, `{"prompt": ..., "answer": ...}`: the format `load_prompts` reads."""
        path = Path(path)
        with path.open("w") as f:
            for question, answer in self.examples(split):
                f.write(json.dumps({"prompt": question, "answer": answer}) + "\n")
        return path

    @functools.cached_property
    def _train(self) -> list[tuple[str, str]]:
        return self._draw(self.num_train, is_eval=False)

    @functools.cached_property
    def _eval(self) -> list[tuple[str, str]]:
        return self._draw(self.num_eval, is_eval=True)

    def _question(self, index: int) -> str:
        n = self._num_operands
        op, rest = divmod(index, n * n)
        a, b = divmod(rest, n)
        return f"{a + self._low}{self.ops[op]}{b + self._low}="

    def _draw(self, count: int, is_eval: bool) -> list[tuple[str, str]]:
        split = "eval" if is_eval else "train"
        rng = random.Random(f"arithmetic:{self.seed}:{split}")
        fraction = self.eval_fraction if is_eval else 1 - self.eval_fraction
        too_many = ValueError(
            f"{self!r}: cannot draw {count} distinct {split} questions from ~{int(self.num_questions * fraction)} "
            "available; lower the split size or use more digits / more ops"
        )
        questions: list[str] = []
        if self.num_questions <= _ENUMERATE_LIMIT:
            for index in rng.sample(range(self.num_questions), self.num_questions):
                if len(questions) == count:
                    break
                question = self._question(index)
                if self.is_held_out(question) == is_eval:
                    questions.append(question)
            if len(questions) < count:
                raise too_many
        else:
            if count > self.num_questions * fraction / 2:  # rejection sampling would crawl
                raise too_many
            seen: set[str] = set()
            while len(questions) < count:
                question = self._question(rng.randrange(self.num_questions))
                if question not in seen and self.is_held_out(question) == is_eval:
                    seen.add(question)
                    questions.append(question)
        return [(q, self.answer(q)) for q in questions]


TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": functools.partial(ArithmeticTask, num_digits=2, ops="+"),
    "arithmetic-3digit": functools.partial(ArithmeticTask, num_digits=3, ops="+"),
    "arithmetic-sub": functools.partial(ArithmeticTask, num_digits=2, ops="-"),
    "arithmetic-mul": functools.partial(ArithmeticTask, num_digits=2, ops="*"),
    "arithmetic-mixed": functools.partial(ArithmeticTask, num_digits=2, ops="+-*"),
    # The built-in preference task: 2-digit addition where the `closeness` rule prefers the answer nearer the
    # sum, and win rates are against a reference response that is off by 1 (beaten only by the exact sum; an answer
    # also off by 1 ties).
    "arithmetic-pref": functools.partial(ArithmeticTask, num_digits=2, ops="+", reference_offset=1),
    # The preference task where good responses are rare: 3-digit addition, judged by the `exact` rule (the sum beats
    # anything else, every wrong answer ties every other): from a short SFT warm start few of a prompt's samples are
    # right, so most random pairs carry no label, the case active exploration is for.
    "arithmetic-pref-rare": functools.partial(ArithmeticTask, num_digits=3, ops="+", reference_offset=1),
}
"""built-in task name -> factory taking `seed`, `num_train`, `num_eval` keywords"""


def make_task(name: str, **kwargs) -> Task:
    """Build the built-in task called `name`; kwargs go to its factory (seed, num_train, num_eval)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
