"""Run configuration: typed dataclasses, loadable from a YAML/TOML/Python file, overridable on the CLI.

Each component's config lives next to it (`LearnerConfig` in winnow.learner, `OracleConfig` in
winnow.oracles, ...); this module composes them into what one run needs, and loads and saves them.

Precedence: dataclass defaults < `--config FILE` < command-line flags. The resolved config is written to
`RUN_DIR/config.yaml`, and that file can be passed back with `--config` to rerun.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml

from winnow.data import DataConfig
from winnow.engines.hf import HFEngineConfig
from winnow.engines.vllm import VLLMEngineConfig
from winnow.learner.learner import LearnerConfig
from winnow.learner.lora import LoraConfig
from winnow.learner.sync import SyncConfig
from winnow.logging import LoggingConfig
from winnow.oracles import OracleConfig
from winnow.types import SamplingParams

AlgoT = TypeVar("AlgoT")


@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str | None = None
    """a hub id or a local directory with a `transformers` causal LM (`winnow quickstart` writes one)"""
    tokenizer: str | None = None
    """tokenizer hub id or directory; defaults to `path`"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""


@dataclass
class RolloutConfig:
    """What the Actor samples each policy iteration."""

    prompts_per_iteration: int = 32
    """prompts drawn per policy iteration"""
    num_samples: int = 8
    """responses sampled per prompt (the group size G of GRPO/RLOO; PPO works with any, 1 included)"""
    temperature: float = 1.0
    """sampling temperature; the learner divides its logits by the same value"""
    top_p: float = 1.0
    """nucleus sampling mass (0, 1]"""
    top_k: int = -1
    """top-k sampling; -1 is off"""
    max_tokens: int = 256
    """generation budget per response (also Dr. GRPO's loss normaliser)"""
    stop: list[str] = field(default_factory=list)
    """stop strings, besides EOS"""
    drop_uniform_groups: bool = False
    """drop groups whose rewards are all equal (they carry no signal with group baselines; DAPO's
    dynamic sampling without the refill); ignored by ppo, whose baseline is its critic"""

    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_samples

    def sampling_params(self) -> SamplingParams:
        """The engine's SamplingParams for one policy iteration (the runtime sets a seed per iteration)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, n=self.num_samples, stop=list(self.stop))


@dataclass
class EvalConfig:
    """Held-out evaluation, run at iteration 0, every `every` iterations and at the end."""

    every: int = 10
    """policy iterations between evaluations; 0 evaluates only at the start and the end"""
    max_prompts: int | None = 256
    """held-out prompts used (None: all)"""
    greedy: bool = True
    """report greedy accuracy"""
    k: int = 4
    """samples per prompt for mean@k accuracy (0 turns it off)"""
    temperature: float = 1.0
    """sampling temperature for mean@k"""
    max_tokens: int | None = None
    """generation budget for eval; None uses rollout.max_tokens"""
    correct_threshold: float = 1.0
    """a response counts as correct when the eval reward is at least this"""


@dataclass
class TrainConfig(Generic[AlgoT]):
    """A policy-iteration run: `winnow train ALGO`."""

    algo: AlgoT
    """the objective: advantages and loss"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (`--lora-rank 8`); the reference is the adapters turned off"""
    engine: HFEngineConfig = field(default_factory=HFEngineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    engine_backend: Literal["hf", "vllm"] = "hf"
    """what the Actor samples with: "hf" (embedded, settings in `engine`) or "vllm" (`pip install
    "winnow[vllm]"`, settings in `vllm_engine`)"""
    vllm_engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    """settings of the vllm engine, used when engine_backend is \"vllm\""""
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    num_iterations: int = 100
    """policy iterations to run"""
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/RUN_NAME"""
    run_name: str | None = None
    """name of the run directory; default ALGO-YYYYmmdd-HHMMSS"""
    seed: int = 0
    """seeds prompt order, sampling and any randomly initialised weights"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda[:N]\""""
    num_threads: int | None = None
    """torch CPU threads; None uses min(4, cores) (more threads than cores thrash)"""
    save_final: bool = True
    """save the trained policy to RUN_DIR/final"""


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
