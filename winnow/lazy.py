"""Modules imported on first use, so that `winnow COMMAND --help` (which builds every config dataclass) never
pays for torch: importing torch takes seconds on a loaded CPU machine, the help needs none of it.

    torch = lazy_import("torch")        # at module level, in place of `import torch`
    torch.zeros(3)                      # the first attribute read imports torch and rebinds `torch` to it

Nothing is put in `sys.modules` until then. `@no_grad` and `@inference_mode` stand for torch's decorators, which
would import torch where a function is defined; `lazy_function` stands for a winnow function whose module defines
a torch class at import (an autograd Function, an nn.Module). Used only by modules that config classes live in (or
that they import); names used in annotations only go under `TYPE_CHECKING` instead. `tests/test_cli_help.py`
checks every command's `--help` for torch, transformers and datasets in `sys.modules`.
"""
from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import Any, Callable


class LazyModule(types.ModuleType):
    """A stand-in for module `name`: the first attribute read imports it and points every winnow global that
    held this stand-in at the real module, so later reads are plain global reads (as fast as `import torch`,
    and a test's monkeypatch of `torch.save` reaches them). Reads through a reference kept elsewhere are
    forwarded, never copied."""

    def __getattr__(self, attribute: str) -> Any:  # every attribute: the stand-in holds none of its own
        module = importlib.import_module(self.__name__)
        _rebind(self, module)
        return getattr(module, attribute)


def _rebind(stand_in: LazyModule, module: types.ModuleType) -> None:
    for name, loaded in list(sys.modules.items()):
        if name == "winnow" or name.startswith("winnow."):
            namespace = vars(loaded)
            for key, value in list(namespace.items()):
                if value is stand_in:
                    namespace[key] = module


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
