"""Environments for multi-turn episodes: the protocol (`Env`, GEM's shape), the GEM adapter, a user's class by
`module:Class` or `file.py:Class`, the Python tool, and the built-in `guess-number` game. `make_env_factory(spec)`
turns `--env SPEC` into a factory of fresh copies."""
from winnow.envs.base import Env, EnvFactory, EnvUnavailableError, StepResult, check_same_start
from winnow.envs.loader import TOOLS, make_env_factory

__all__ = ["Env", "EnvFactory", "EnvUnavailableError", "StepResult", "check_same_start", "make_env_factory", "TOOLS"]
