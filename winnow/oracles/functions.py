"""Reward functions by name, and `FunctionOracle`, which combines them into one weighted reward.

A reward function is a plain callable, `fn(prompts, completions, reference, **columns) -> list[float | None]`
(see `RewardFunction`). The oracle scores the batch with each function, retries transient failures, and
reports each function's scores and latency separately, so a shaping term can be watched apart from the
verifier it is added to.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from winnow.oracles.base import RewardFunction
from winnow.oracles.math import MathGrader, MathReward
from winnow.oracles.rules import (MissingReferenceError, boxed_format_reward, closeness_reward, exact_match_reward,
                                  reasoning_gym_reward)
from winnow.types import RewardResult

logger = logging.getLogger(__name__)

BUILTIN_REWARDS = ("math", "exact", "boxed_format", "closeness", "reasoning_gym")
_SPEC_FORMS = f"a builtin ({', '.join(BUILTIN_REWARDS)}), 'module:function' or 'path/to/file.py:function'"


class RewardFunctionError(ValueError):
    """A reward function broke its contract (wrong length, a non-number): a bug to fix, never retried."""


def load_reward_function(
    spec: str, *, math_timeout_s: float = 5.0, math_num_workers: int = 2
) -> tuple[str, RewardFunction]:
    """(name, function) for `spec`: a builtin name, `module:function`, or `path/to/file.py:function`.

    The name is the builtin's or the function's own; the oracle reports scores and latency under it. "math"
    gets a grader pool of its own (`math_num_workers` processes, `math_timeout_s` per answer), started on
    first use and stopped by the oracle's `close()`.
    """
    spec = spec.strip()
    if spec == "math":
        return "math", MathReward(MathGrader(num_workers=math_num_workers, timeout=math_timeout_s))
    if spec == "exact":
        return "exact", exact_match_reward
    if spec == "boxed_format":
        return "boxed_format", boxed_format_reward
    if spec == "closeness":
        return "closeness", closeness_reward
    if spec == "reasoning_gym":
        return "reasoning_gym", reasoning_gym_reward
    target, _, attribute = spec.rpartition(":")
    if spec.endswith(".py"):
        raise ValueError(f"reward {spec!r} names a file but not the function in it: use '{spec}:function'")
    if not target or not attribute:
        raise ValueError(f"unknown reward {spec!r}: use {_SPEC_FORMS}")
    module = _load_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    fn = getattr(module, attribute, None)
    if fn is None:
        defined = [n for n, v in vars(module).items()
                   if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
        raise ValueError(f"reward {spec!r}: {target!r} has no {attribute!r}; functions defined there: "
                         f"{', '.join(defined) or 'none'}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attribute!r} is a {type(fn).__name__}, not a function; point at "
                         f"a function fn(prompts, completions, reference, **columns) -> list[float]")
    return attribute, fn


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # the module exists but one of its own imports is missing: that error says which
        raise ValueError(f"reward {spec!r}: no module named {e.name!r}; install it or add its folder to "
                         f"PYTHONPATH, or name a file instead: 'path/to/file.py:{spec.rpartition(':')[2]}'") from e


def _load_file(path: str, spec: str) -> ModuleType:
    """Import a user's .py file under a name unique to its location (two `rewards.py` files do not clash)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"reward {spec!r}: no file {str(file)!r} (a relative path starts from the current "
                         f"directory, {Path.cwd()})")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]
    module_name = f"_winnow_reward_{re.sub(r'[^0-9a-zA-Z_]', '_', file.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before running it, as `import` does (dataclasses look it up)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@dataclass
class _Batch:
    """The arguments every reward function gets, N entries each."""

    prompts: list[str]
    completions: list[str]
    references: list[str | None]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.completions)

    def rows(self, indices: list[int]) -> _Batch:
        return _Batch([self.prompts[i] for i in indices], [self.completions[i] for i in indices],
                      [self.references[i] for i in indices],
                      {k: [v[i] for i in indices] for k, v in self.columns.items()})


class FunctionOracle:
    """A `RewardOracle` that scores with weighted reward functions: score = sum_k weight_k * fn_k(...).

    Failures, by kind: a function that raises is called again on the whole batch, after `retry_backoff`,
    then twice that, ... up to `max_retries` times; then its completions are unscored (None) and the error
    is logged; `max_failed_calls` such calls in a row (a function that fails on every call) raise
    `RewardFunctionError` with the last error instead of leaving batch after batch unscored. Completions a
    function itself returned None for (a grader timeout) get one more try each, together in one smaller call (so a grader pool retries them in parallel). A completion is unscored when
    any component is. A function that breaks the contract (wrong length, a non-number, a missing reference
    column, finite scores whose weighted sum overflows to inf) raises at once: that is a bug, not bad luck.
    """

    def __init__(
        self,
        functions: Sequence[tuple[str, RewardFunction, float]],
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        max_failed_calls: int = 3,
    ) -> None:
        names = [name for name, _, _ in functions]
        if not functions:
            raise ValueError("FunctionOracle needs at least one reward function")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}; rename a function to tell them apart")
        for name, fn, weight in functions:
            if not callable(fn):
                raise ValueError(f"reward {name!r} is a {type(fn).__name__}, not a function")
            if not math.isfinite(weight):
                raise ValueError(f"reward {name!r} has weight {weight}; weights must be finite numbers")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} must be >= 0")
        self.functions = list(functions)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_failed_calls = max_failed_calls
        self._failed_calls: dict[str, int] = {}  # calls in a row on which a function raised every attempt

    @property
    def reference_rewards(self) -> list[str]:
        """The functions that need a reference answer for every completion (`fn.needs_reference`)."""
        return [name for name, fn, _ in self.functions if getattr(fn, "needs_reference", False)]

    def reward(
        self,
        prompts: list[str],
        completions: list[str],
        references: list[str | None],
        columns: dict[str, list[Any]] | None = None,
    ) -> RewardResult:
        batch = _Batch(list(prompts), list(completions), list(references), dict(columns or {}))
        _check_batch(batch)
        start = time.perf_counter()
        components: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        num_retries = 0
        for name, fn, _ in self.functions:
            fn_start = time.perf_counter()
            components[name], retries = self._score(name, fn, batch)
            num_retries += retries
            metrics[f"oracle/{name}/latency_s"] = time.perf_counter() - fn_start
        scores: list[float | None] = []
        for i in range(len(batch)):
            parts = [(weight, components[name][i]) for name, _, weight in self.functions]
            is_scored = all(s is not None for _, s in parts)
            total = sum(w * s for w, s in parts) if is_scored else None
            if total is not None and not math.isfinite(total):  # finite parts that overflow: 1e308 + 1e308
                raise RewardFunctionError(
                    f"the weighted sum of rewards {[(name, components[name][i]) for name, _, _ in self.functions]} "
                    f"for completion {i} is {total}: scores must be finite numbers of a sane scale")
            scores.append(total)
        metrics["oracle/latency_s"] = time.perf_counter() - start
        metrics["oracle/num_failed"] = float(sum(s is None for s in scores))
        metrics["oracle/num_retries"] = float(num_retries)
        return RewardResult(scores, components, metrics)

    def _score(self, name: str, fn: RewardFunction, batch: _Batch) -> tuple[list[float | None], int]:
        """One function's scores and how many retries they took: the batch (with retries), then the
        completions it returned None for once more (a retry each)."""
        scores, num_retries = self._call(name, fn, batch, num_attempts=1 + self.max_retries)
        if scores is None:
            return [None] * len(batch), num_retries
        unscored = [i for i, s in enumerate(scores) if s is None]
        if unscored:
            retried, _ = self._call(name, fn, batch.rows(unscored), num_attempts=1)
            for i, s in zip(unscored, retried or [None] * len(unscored)):
                scores[i] = s
            num_retries += len(unscored)
        return scores, num_retries

    def _call(
        self, name: str, fn: RewardFunction, batch: _Batch, num_attempts: int
    ) -> tuple[list[float | None] | None, int]:
        """fn's validated scores, or None if every attempt raised; and the number of retries made."""
        _check_signature(name, fn, batch)
        for attempt in range(num_attempts):
            if attempt > 0:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                out = fn(batch.prompts, batch.completions, reference=batch.references, **batch.columns)
            except MissingReferenceError:
                raise
            except Exception as e:
                error = e
                logger.warning("reward %r raised on attempt %d of %d: %r", name, attempt + 1, num_attempts, e)
                continue
            self._failed_calls[name] = 0
            return _validate(name, out, len(batch)), attempt
        self._failed_calls[name] = self._failed_calls.get(name, 0) + 1
        if self._failed_calls[name] >= self.max_failed_calls:
            raise RewardFunctionError(
                f"reward {name!r} raised on every attempt of its last {self._failed_calls[name]} calls "
                f"({num_attempts} attempts each, --oracle.max-retries {num_attempts - 1}); last error: {error!r}. "
                f"Fix the function; nothing it could score was trained on") from error
        logger.error("reward %r failed %d times; its %d completions are unscored", name, num_attempts,
                     len(batch), exc_info=error)
        return None, num_attempts - 1

    def close(self) -> None:
        """Stop what the reward functions hold (the math grader's processes): any function with a `close`."""
        for _, fn, _ in self.functions:
            if callable(getattr(fn, "close", None)):
                fn.close()


def _check_batch(batch: _Batch) -> None:
    n = len(batch)
    lengths = {"prompts": len(batch.prompts), "references": len(batch.references),
               **{f"column {k!r}": len(v) for k, v in batch.columns.items()}}
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise ValueError(f"{n} completions but {wrong}: every argument needs one entry per completion")
    clashes = {"prompts", "completions", "reference"} & set(batch.columns)
    if clashes:
        raise ValueError(f"dataset columns {sorted(clashes)} clash with the reward functions' own arguments; "
                         f"rename them in the dataset")


def _check_signature(name: str, fn: RewardFunction, batch: _Batch) -> None:
    """Raise a clear error now if fn cannot take winnow's arguments, rather than retry a TypeError."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none to inspect
        return
    try:
        signature.bind(batch.prompts, batch.completions, reference=batch.references, **batch.columns)
    except TypeError as e:
        raise RewardFunctionError(
            f"reward {name!r} cannot take winnow's arguments ({e}); define it as "
            f"def {name}(prompts, completions, reference, **columns) -> list[float]"
        ) from e


def _validate(name: str, out: Any, n: int) -> list[float | None]:
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(f"reward {name!r} returned a {type(out).__name__}; it must return a list of "
                                  f"{n} floats, one per completion (None where it cannot score)")
    if len(out) != n:
        raise RewardFunctionError(f"reward {name!r} returned {len(out)} scores for {n} completions; it must "
                                  f"return one per completion, in order")
    scores: list[float | None] = []
    for i, s in enumerate(out):
        if s is not None and not (isinstance(s, numbers.Real) and math.isfinite(s)):
            raise RewardFunctionError(f"reward {name!r} returned {s!r} ({type(s).__name__}) for completion {i}; "
                                      f"scores must be finite numbers, or None where it cannot score")
        scores.append(None if s is None else float(s))
    return scores
