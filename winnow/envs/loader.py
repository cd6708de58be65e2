"""`--env SPEC` to an `EnvFactory`: one name for every source of environments.

    guess-number[:HIGH[:MAX_TURNS]]    the built-in game (winnow.envs.guess_number), e.g. guess-number:9:3
    gem:ID                             a GEM environment, e.g. gem:game:GuessTheNumber-v0-easy, gem:rg:letter_counting
    module.path:Class                  a user's class, imported (it must be importable: PYTHONPATH)
    path/to/file.py:Class              a user's class, loaded from a file

A user's class is called with no arguments for each episode and must have `reset(seed)` and `step(action)`
(`winnow.envs.Env`; a `gem.Env` subclass fits). `--env-tools python` wraps any of them in the Python tool.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path

from winnow.envs.base import Env, EnvFactory, EnvUnavailableError, check_same_start
from winnow.envs.gem_env import GEMEnv, make_gem
from winnow.envs.guess_number import GuessNumberEnv
from winnow.envs.python_tool import PythonTool, PythonToolConfig, ToolEnv

TOOLS = {"python": PythonTool}
"""tools by the name `--env-tools` takes"""


def make_env_factory(spec: str, tools: list[str] | tuple[str, ...] = (),
                     tool_config: PythonToolConfig | None = None) -> EnvFactory:
    """The factory `spec` names, checked now (made once, copies reset alike) rather than mid-run."""
    factory = _base_factory(spec)
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"--env-tools {' '.join(unknown)}: unknown tool; tools are {', '.join(TOOLS)}")
    if tools:
        factory = functools.partial(_with_tools, factory, list(tools), tool_config)
    env = factory()
    if not isinstance(env, Env):
        raise ValueError(f"--env {spec}: {type(env).__name__} has no reset(seed) and step(action); an environment "
                         f"needs both (see winnow.envs.Env)")
    check_same_start(factory, seed=0)
    return factory


def _with_tools(factory: EnvFactory, tools: list[str], tool_config: PythonToolConfig | None) -> ToolEnv:
    return ToolEnv(factory(), [TOOLS[name](tool_config) for name in tools])


def _base_factory(spec: str) -> EnvFactory:
    if spec.startswith("gem:"):
        env_id = spec[len("gem:"):]
        make_gem(env_id)  # fails now, with the reason, if GEM or the environment's data is missing
        return functools.partial(GEMEnv, env_id)
    if spec == "guess-number" or spec.startswith("guess-number:"):
        return functools.partial(GuessNumberEnv, *_ints(spec, spec.split(":")[1:]))
    if ":" in spec:
        return _user_class(spec)
    raise ValueError(f"--env {spec!r}: not an environment; use guess-number, gem:ID (e.g. "
                     f"gem:game:GuessTheNumber-v0-easy), module.path:Class or path/to/file.py:Class")


def _ints(spec: str, parts: list[str]) -> list[int]:
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--env {spec!r}: guess-number takes guess-number[:HIGH[:MAX_TURNS]], e.g. guess-number:9:3")
    return [int(p) for p in parts]


def _user_class(spec: str) -> EnvFactory:
    """`module.path:Class` or `file.py:Class`."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"--env {spec}: no file {where}")
        module_spec = importlib.util.spec_from_file_location(f"winnow_user_env_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"--env {spec}: cannot import {where!r} ({e}); is it on PYTHONPATH?") from e
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"--env {spec}: {where} has no {name!r}")
    return cls


__all__ = ["make_env_factory", "EnvUnavailableError", "TOOLS"]
