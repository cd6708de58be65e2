"""Math answer grading: take a response's final answer and compare it with the reference using math-verify.

math-verify parses both sides into sympy and compares them symbolically, so `\\frac{1}{2}`, `0.5` and `1/2`
agree, as do `2x+2` and `2(x+1)`. Sympy can also run for minutes on an answer like `\\boxed{9^{9^{9}}}`.
math-verify's own time limit is `signal.alarm`, which raises only on the main thread (a trainer that
scores in a background thread gets a ValueError instead) and only between Python bytecodes. So grading runs
in a `WorkerPool` with math-verify's limits off, and the pool enforces the deadline by killing the worker.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Sequence


from winnow.oracles.rules import BOX_OPEN, last_boxed, require_references
from winnow.oracles.workers import WorkerPool

logger = logging.getLogger(__name__)

# "the answer is $\frac{1}{2}$." -> "$\frac{1}{2}$": up to a sentence-ending period (not a decimal point)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:\.(?=\s|$)|$)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None when it gives none.

    In order: the content of the last `\\boxed{}` / `\\fbox{}` (an empty or unclosed last box is no answer);
    else what follows the last "answer is"; else the last number in the text.
    """
    if BOX_OPEN.search(response):
        return last_boxed(response) or None
    stated = _ANSWER_IS.findall(response)
    if stated:
        return stated[-1].strip().strip("$*").strip() or None
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _is_equivalent(response: str, reference: str) -> bool:
    """The grading itself, with no time limit: only ever call it in a worker the parent can kill."""
    answer = extract_answer(response)
    if answer is None:
        return False
    # Boxing both sides makes math-verify read them as LaTeX; a bare "0.5" gold is otherwise read as plain
    # text, where "\frac{\sqrt{2}}{2}" does not parse at all.
    import math_verify  # here, in the grading worker: importing winnow.oracles does not need it

    gold_answer = last_boxed(reference) or reference.strip()
    gold = math_verify.parse(f"\\boxed{{{gold_answer}}}", parsing_timeout=None)
    pred = math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))


def _init_worker() -> None:
    """Quiet math-verify's "timeout is disabled" warning (intended here), and grade once: the first grade
    in a process builds math-verify's LaTeX parser, a few hundred ms that no item's deadline should pay."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _is_equivalent("\\boxed{\\frac{1}{2}}", "0.5")


class MathGrader(WorkerPool):
    """Grader processes with a per-answer deadline: see `WorkerPool` for starting, restarts and closing."""

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, **pool_options: Any) -> None:
        super().__init__(_is_equivalent, num_workers, timeout, initializer=_init_worker, **pool_options)

    def grade_batch(
        self, responses: Sequence[str], references: Sequence[str], timeout: float | None = None
    ) -> list[bool | None]:
        """Whether each response's final answer equals its reference; None where grading overran `timeout`
        seconds (default: the pool's) or crashed, i.e. the answer was not graded."""
        if len(responses) != len(references):
            raise ValueError(f"got {len(responses)} responses but {len(references)} references")
        results = self.map(list(zip(responses, references)), timeout)
        failed = [r for r, ok in zip(responses, results) if ok is None]
        if failed:
            logger.warning("%d of %d answers not graded (over %.1fs or crashed); the first: %.200r", len(failed),
                           len(results), timeout or self.timeout, failed[0])
        return results


_default_grader: MathGrader | None = None
_default_grader_lock = threading.Lock()


def default_grader() -> MathGrader:
    """The process-wide grader behind `grade` and `math_reward`: one worker, started on first use."""
    global _default_grader
    with _default_grader_lock:
        if _default_grader is None:
            _default_grader = MathGrader(num_workers=1)
        return _default_grader


def grade(response: str, reference: str, timeout: float = 5.0) -> bool:
    """Whether the response's final answer (its last `\\boxed{}` first) equals the reference mathematically.

    An answer that cannot be graded within `timeout` seconds, or that crashes the grader, counts as wrong
    (False): for a yes/no question that is the safe answer. Use `MathGrader.grade_batch` to tell "wrong"
    from "not graded".
    """
    return default_grader().grade_batch([response], [reference], timeout=timeout)[0] is True


def _score(grader: MathGrader, completions: list[str], reference: Sequence[str | None]) -> list[float | None]:
    answers = require_references(reference, "math")
    return [None if ok is None else float(ok) for ok in grader.grade_batch(completions, answers)]


def math_reward(
    prompts: list[str], completions: list[str], reference: list[str | None], **columns: Any
) -> list[float | None]:
    """1.0 where a completion's final answer equals its reference (see `grade`), 0.0 where not, None where
    grading timed out or crashed. Uses the process-wide `default_grader`."""
    return _score(default_grader(), completions, reference)


class MathReward:
    """`math_reward` on a grader pool of its own, which `close()` stops (the oracle closes it)."""

    needs_reference = True
    """it compares with the reference answer: a run checks at load time that every row has one"""

    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader

    def __call__(
        self, prompts: list[str], completions: list[str], reference: list[str | None], **columns: Any
    ) -> list[float | None]:
        return _score(self.grader, completions, reference)

    def close(self) -> None:
        self.grader.close()
