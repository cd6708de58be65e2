"""Run configuration files and flags: parse, merge, load, save. Nothing else.

Each component's config lives next to it (`LearnerConfig` in winnow.learner, `OracleConfig` in
winnow.oracles, ...) and each command's run config in its recipe (`winnow.recipes.rl.TrainConfig`, ...);
this module only reads them from files and flags and writes them back.

Precedence: dataclass defaults < `--config FILE` < command-line flags. The resolved config is written to
`RUN_DIR/config.yaml`, and that file can be passed back with `--config` to rerun.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml


# ---------------------------------------------------------------------- files


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML, JSON or Python config file into a nested dict.

    A Python file defines `config`: a dict, or a config dataclass instance.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(path.read_text())
    elif suffix == ".json":
        data = json.loads(path.read_text())
    elif suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_winnow_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "config"):
            raise ValueError(f"{path} must define `config` (a dict or a config dataclass)")
        data = module.config
        if dataclasses.is_dataclass(data):
            data = dataclasses.asdict(data)
    else:
        raise ValueError(f"config file {path}: unknown format {suffix!r}; use .yaml, .toml, .json or .py")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def merge(instance: Any, data: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass `instance` with the values in `data` applied, recursively and type-checked."""
    fields = {f.name: f for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    changes = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(
                f"unknown config key {where}{key!r}; valid keys here: {', '.join(sorted(fields))}"
            )
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = merge(current, value, f"{where}{name}.")
        else:
            changes[name] = _coerce(value, hints.get(name), f"{where}{name}")
    return dataclasses.replace(instance, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Light type check of a file value against its field's annotation, with a clear message."""
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"config key {where} must be {hint.__name__}, got {value!r}")
    if origin is list and not isinstance(value, list):
        raise ValueError(f"config key {where} must be a list, got {value!r}")
    if origin in (typing.Union, types.UnionType) and value is not None:
        simple = [a for a in typing.get_args(hint) if a in (int, float, str, bool)]
        if simple and not isinstance(value, tuple(simple)) and not (float in simple and isinstance(value, int)):
            raise ValueError(f"config key {where} must be {' or '.join(a.__name__ for a in simple)}, got {value!r}")
    return value


def save_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(config)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull `--config FILE` (or `--config=FILE`) out of argv; tyro parses the rest."""
    rest, path = [], None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("--config needs a file path")
            path = argv[i + 1]
            next(it, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def parse(cls: type, default: Any, argv: list[str], prog: str, description: str | None = None) -> Any:
    """Defaults < --config FILE < flags. `cls` is the (possibly parametrised) config type."""
    import tyro

    path, rest = split_config_flag(argv)
    if path is not None:
        default = merge(default, load_config_file(path))
    description = (description or "") + (
        "\n\nSettings: defaults < --config FILE (YAML, TOML, JSON or Python) < the flags below."
    )
    return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)


# Where the run configs that used to live here are now (kept importable from here for one release).
_MOVED = {"TrainConfig": "winnow.recipes.rl", "ModelConfig": "winnow.setup", "RolloutConfig": "winnow.loops.config",
          "EvalConfig": "winnow.loops.config"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"winnow.config.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
