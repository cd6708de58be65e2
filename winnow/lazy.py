"""Modules imported on first use, so that `winnow COMMAND --help` (which builds every config dataclass) never
pays for torch: importing torch takes seconds on a loaded CPU machine, the help needs none of it.

    torch = lazy_import("torch")        # at module level, in place of `import torch`
    torch.zeros(3)                      # the first attribute read imports torch; later reads are plain

Nothing is put in `sys.modules` until then. `@no_grad` and `@inference_mode` stand for torch's decorators, which
would import torch where a function is defined; `lazy_function` stands for a winnow function whose module defines
a torch class at import (an autograd Function, an nn.Module). Used only by modules that config classes live in (or
that they import); names used in annotations only go under `TYPE_CHECKING` instead. `tests/test_cli_help.py`
checks every command's `--help` for torch, transformers and datasets in `sys.modules`.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable


class LazyModule(types.ModuleType):
    """A stand-in for module `name` that imports it on the first attribute read, then copies its namespace in."""

    def __getattr__(self, attribute: str) -> Any:  # called only for names not yet in this module's namespace
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attribute)


def lazy_import(name: str) -> Any:
    """Module `name`, imported when one of its attributes is first read."""
    return LazyModule(name)


def no_grad(function: Callable) -> Callable:
    """`@torch.no_grad()` whose torch is imported at the first call, not where the function is defined."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


def inference_mode(function: Callable) -> Callable:
    """`@torch.inference_mode()`, its torch imported at the first call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return function(*args, **kwargs)

    return wrapper


def lazy_function(module: str, name: str) -> Callable:
    """Function `name` of winnow module `module`, imported at the first call (for a module whose import
    needs torch, used by one that must import without it)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
