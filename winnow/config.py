"""Run configuration files and flags: parse, merge, load, save. Nothing else.

Each component's config lives next to it (`LearnerConfig` in winnow.learner, `OracleConfig` in
winnow.oracles, ...) and each command's run config in its recipe (`winnow.recipes.rl.TrainConfig`, ...);
this module only reads them from files and flags and writes them back.

Precedence: dataclass defaults < `--config FILE` < command-line flags. The resolved config is written to
`RUN_DIR/config.yaml`, and that file can be passed back with `--config` to rerun.

Renamed settings keep their old names for one release: a config dataclass may declare
`config_aliases: ClassVar[dict[str, str]]` (old key -> new dotted key below it) and
`config_alias_implies: ClassVar[dict[str, dict[str, Any]]]` (old key -> what else it meant when given a
value); `parse` applies them to flags and `merge` to config-file keys, with a FutureWarning, before either
is used. See `OracleConfig` for the one in use.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
import warnings
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
    data = resolve_key_aliases(type(instance), data, where)
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
    rest = resolve_flag_aliases(default, rest)
    if path is not None:
        default = merge(default, load_config_file(path))
    description = (description or "") + (
        "\n\nSettings: defaults < --config FILE (YAML, TOML, JSON or Python) < the flags below."
    ) + _aliases_help(default)
    return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)


# ---------------------------------------------------------------------- old names


def resolve_key_aliases(cls: type, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`data` (one level of a config file, for dataclass `cls`) with `cls.config_aliases`' old keys moved to
    their new nested places, and what they imply (`cls.config_alias_implies`) added.

    An implied value yields to one the same mapping gives explicitly, unless that is the field's default (an
    old file that says `url: ...` and `kind: rule` meant the remote oracle). Giving a key under both its old
    and its new name is an error."""
    aliases = getattr(cls, "config_aliases", None)
    if not aliases or not any(key.replace("-", "_") in aliases for key in data):
        return data
    out = {key.replace("-", "_"): value for key, value in data.items() if key.replace("-", "_") not in aliases}
    implied: dict[str, Any] = {}
    renamed = []
    for key, value in data.items():
        old = key.replace("-", "_")
        if old not in aliases:
            continue
        new = aliases[old]
        renamed.append((f"{where}{key}", f"{where}{new}"))
        *parents, leaf = new.split(".")
        node = out
        for parent in parents:  # copied on the way down: `data` itself stays as it was
            child = node.get(parent, {})
            if not isinstance(child, dict):
                raise ValueError(f"config key {where}{parent} must be a mapping, got {child!r}")
            node[parent] = {k.replace("-", "_"): v for k, v in child.items()}
            node = node[parent]
        if leaf in node:
            raise ValueError(f"config key {where}{key} is the old name of {where}{new}, which is set already; keep "
                             f"only {where}{new}")
        node[leaf] = value
        if value is not None:
            implied.update(getattr(cls, "config_alias_implies", {}).get(old, {}))
    for key, value in implied.items():
        if key not in out or out[key] == _field_default(cls, key):
            out[key] = value
    _warn_renamed(renamed)
    return out


def resolve_flag_aliases(default: Any, argv: list[str]) -> list[str]:
    """`argv` with the old flags of every config dataclass in `default`'s tree renamed (`--oracle.url X` ->
    `--oracle.remote.url X`; `--x=v`, dashes or underscores alike) and what they imply appended
    (`--oracle.kind remote`), unless the flags set that themselves to a value other than its default."""
    owners = _alias_owners(default)
    if not owners:
        return argv
    out, implied, renamed = [], {}, []
    for i, arg in enumerate(argv):
        name, eq, value = _split_flag(arg)
        hit = next(((prefix, cls) for prefix, cls in owners
                    if name.startswith(prefix) and name[len(prefix):] in cls.config_aliases), None)
        if hit is None:
            out.append(arg)
            continue
        prefix, cls = hit
        old = name[len(prefix):]
        new = "--" + (prefix + cls.config_aliases[old]).replace("_", "-")
        renamed.append((arg.partition("=")[0], new))
        out.append(new + eq + value)
        given = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if given not in (None, "None"):
            implied.update({prefix + key: (str(_field_default(cls, key)), str(v))
                            for key, v in getattr(cls, "config_alias_implies", {}).get(old, {}).items()})
    for key, (default_value, value) in implied.items():
        explicit = None  # the last value the flags give `key` (the one tyro keeps)
        for i, arg in enumerate(out):
            name, eq, given = _split_flag(arg)
            if name == key:
                explicit = given if eq else (out[i + 1] if i + 1 < len(out) else None)
        if explicit in (None, default_value):
            out += ["--" + key.replace("_", "-"), value]
    _warn_renamed(renamed)
    return out


def _split_flag(arg: str) -> tuple[str, str, str]:
    """("oracle.reward_model.path", "=", "DIR") for "--oracle.reward-model.path=DIR"; names with underscores."""
    if not arg.startswith("--"):
        return "", "", ""
    name, eq, value = arg[2:].partition("=")
    return name.replace("-", "_"), eq, value


def _alias_owners(instance: Any, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, class) of each dataclass in `instance`'s tree that declares `config_aliases`."""
    owners = [(prefix, type(instance))] if getattr(instance, "config_aliases", None) else []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            owners += _alias_owners(value, f"{prefix}{f.name}.")
    return owners


def _aliases_help(default: Any) -> str:
    names = [f"--{prefix}{old} (now --{prefix}{new})".replace("_", "-")
             for prefix, cls in _alias_owners(default) for old, new in cls.config_aliases.items()]
    return "\n\nOld names, accepted for one release: " + ", ".join(names) + "." if names else ""


def _field_default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _warn_renamed(renamed: list[tuple[str, str]]) -> None:
    if renamed:
        warnings.warn("old setting names, accepted for this release only: "
                      + ", ".join(f"{old} (now {new})" for old, new in renamed), FutureWarning, stacklevel=3)


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
