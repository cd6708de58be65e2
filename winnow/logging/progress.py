"""A tqdm progress bar that turns itself off where it would only add noise.

The bar is for a person watching a terminal. Under a scheduler or in CI, stderr is a file, and a
bar there writes a carriage-return-mangled line per refresh; `metrics.jsonl` already holds the
numbers. So the bar draws only when enabled *and* its stream is a TTY. When off, it is still a
real tqdm: iteration, `update` and `set_postfix` work and cost next to nothing, so callers never
branch on whether it is shown. One catch: a disabled tqdm does not advance `bar.n`, so keep your
own step counter rather than reading it off the bar.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable_or_total: Iterable[T] | int, desc: str, enabled: bool = True, **tqdm_kwargs: Any) -> tqdm:
    """A bar over an iterable, or over `total` steps advanced with `bar.update(n)`.

    Examples:
        for batch in progress(loader, "sft", enabled=cfg.logging.progress): ...

        with progress(num_steps, "train", enabled=cfg.logging.progress) as bar:
            for step in range(num_steps):
                ...
                bar.set_postfix(reward=f"{reward:.3f}", accuracy=f"{acc:.3f}")
                bar.update(1)

    Print with `tqdm.write` (or log to a file) inside the loop; a bare `print` tears the bar.
    """
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, tqdm_kwargs.pop("total", None)
    # tqdm's disable=None means "disable when the output stream is not a TTY".
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=None if enabled else True,
        dynamic_ncols=True,
        **tqdm_kwargs,
    )
