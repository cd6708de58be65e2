"""Rule-based rewards: exact match and answer format, plus the text helpers the math grader shares.

Every reward here has the ecosystem's signature, `fn(prompts, completions, reference, **columns)`, and
returns one float per completion.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
"""the start of a box: `\\boxed{` or `\\fbox{`"""
_WHITESPACE = re.compile(r"\s+")


class MissingReferenceError(ValueError):
    """A reward that needs reference answers got a prompt without one: a configuration error, so the
    oracle raises it at once instead of retrying it like a flaky grader."""


def require_references(reference: Sequence[str | None], reward_name: str) -> list[str]:
    """`reference`, checked to hold an answer for every completion."""
    missing = [i for i, r in enumerate(reference) if r is None]
    if missing:
        raise MissingReferenceError(
            f"reward {reward_name!r} compares completions with reference answers, but {len(missing)} of "
            f"{len(reference)} prompts have none (first: completion {missing[0]}); set --data.answer-column "
            f"to the dataset column that holds the answers, or use a reward that needs none (boxed_format)"
        )
    return list(reference)  # type: ignore[arg-type]  # no None left


def last_boxed(text: str) -> str | None:
    """The stripped content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, nested braces included.

    None when there is no box, or when the last box is never closed: a response truncated inside its final
    answer has not given one, and an earlier box is usually a rejected intermediate result. Escaped braces
    (`\\{`, `\\}`, as in `\\boxed{\\{1, 2\\}}`) are content, not nesting.
    """
    starts = [m.end() for m in BOX_OPEN.finditer(text)]
    if not starts:
        return None
    depth = 1
    for i in range(starts[-1], len(text)):
        if text[i] in "{}" and text[i - 1] == "\\":
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1]:i].strip()
    return None


def normalize_text(text: str) -> str:
    """`text` stripped, with each run of whitespace (spaces, tabs, newlines) made one space. Case and
    punctuation are kept: "46" and "46." differ, as they do to a strict exact-match grader."""
    return _WHITESPACE.sub(" ", text.strip())


def exact_match_reward(
    prompts: list[str], completions: list[str], reference: list[str | None], **columns: Any
) -> list[float]:
    """1.0 where the completion equals its reference after `normalize_text` on both, else 0.0.

    For tasks whose answer is the whole response (the built-in arithmetic tasks: "12+34=" -> "46"). Raises
    MissingReferenceError when a prompt has no reference.
    """
    answers = require_references(reference, "exact")
    return [float(normalize_text(c) == normalize_text(a)) for c, a in zip(completions, answers)]


def boxed_format_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1.0 where the completion's last `\\boxed{...}` is closed and not empty, else 0.0.

    A format reward: it checks that an answer is there, not that it is right, so it needs no reference.
    """
    return [float(bool(last_boxed(c))) for c in completions]


CLOSENESS_CAP = 10.0
"""the largest distance `closeness_reward` tells apart: answers further off (or not numbers) all score -10"""


def closeness_reward(
    prompts: list[str], completions: list[str], reference: list[str | None], **columns: Any
) -> list[float]:
    """-min(|answer - reference|, 10) for an integer answer, -10 for anything else: 0 is exact.

    A graded rule for preference learning on numeric tasks: of two wrong answers the closer one is preferred,
    so a pair carries signal even when neither response is right (exact match would call it a tie).
    """
    answers = require_references(reference, "closeness")
    scores = []
    for completion, answer in zip(completions, answers):
        text = normalize_text(completion)
        is_integer = text.lstrip("-").isdigit() and text.count("-") <= 1
        scores.append(-min(abs(int(text) - int(answer)), CLOSENESS_CAP) if is_integer else -CLOSENESS_CAP)
    return [float(s) for s in scores]


REASONING_GYM_ENTRY = "reasoning_gym_entry"
"""the column holding a reasoning-gym row's entry (JSON), written by `--data.train reasoning_gym:NAME`"""
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def final_answer(completion: str) -> str:
    """The answer a response gives: the last `<answer>...</answer>`, else the last closed `\\boxed{}`, else the
    whole response, stripped."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    boxed = last_boxed(completion)
    return completion.strip() if boxed is None else boxed


def reasoning_gym_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """The reasoning-gym task's own scorer (`score_answer(answer, entry)`, in [0, 1]) on each response's
    `final_answer`. Needs the rows of `--data.train reasoning_gym:NAME` (their `reasoning_gym_entry` column)."""
    import json

    entries = columns.get(REASONING_GYM_ENTRY)
    if entries is None or any(e is None for e in entries):
        raise MissingReferenceError(
            f"reward 'reasoning_gym' scores with the task's own scorer and needs the {REASONING_GYM_ENTRY!r} column "
            "that --data.train reasoning_gym:NAME writes; train on a reasoning-gym task or use another reward")
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError('the reasoning_gym reward needs the package: pip install "winnow[reasoning-gym]"') from error
    scores = []
    for completion, text in zip(completions, entries):
        entry = json.loads(text)
        score_answer = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        scores.append(float(score_answer(final_answer(completion), entry)))
    return scores


# Rewards that compare with the reference answer: a run checks at load time that every row has one.
exact_match_reward.needs_reference = True  # type: ignore[attr-defined]
closeness_reward.needs_reference = True  # type: ignore[attr-defined]
