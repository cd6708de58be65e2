"""Metrics sinks: a JSONL file that is always written, plus TensorBoard and wandb when asked for.

`metrics.jsonl` is the source of truth: one JSON object per `log` call, flushed at once, so a run
that crashes or is killed keeps every line it logged, and `plot.py` needs nothing but this file.
TensorBoard and wandb are views on the same numbers; they are imported only when enabled, so a
bare install never pays for (or breaks on) either.

Non-finite floats: JSON has no NaN or Infinity, and `json.dumps` would write the invalid bare
tokens `NaN`/`Infinity`. A non-finite value is written as `null` (so its column stays numeric for
pandas, jq and every strict JSON reader: `pd.read_json(path, lines=True)` gives float64 with NaN),
and the row's `nonfinite` object names each such metric with what it was ("NaN", "Infinity",
"-Infinity"), so a diverging loss stays visible as such and is counted apart from a missing one;
`read_metrics` puts the floats back.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = ("online", "offline", "disabled")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

NONFINITE_KEY = "nonfinite"
"""the row's {metric: "NaN" | "Infinity" | "-Infinity"} for the metrics written as null"""
# The names written for non-finite floats, and back.
_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass
class LoggingConfig:
    """Where a run's metrics go besides `metrics.jsonl`, and whether to draw a progress bar."""

    tensorboard: bool = False
    """also write TensorBoard event files under `run_dir/tensorboard`"""
    wandb: bool = False
    """also log to Weights & Biases (see `wandb_mode`)"""
    wandb_project: str = "winnow"
    """the wandb project the run is filed under"""
    wandb_mode: WandbMode = "offline"
    """online syncs live; offline writes run_dir/wandb with no network (`wandb sync` it later); disabled: no-op"""
    wandb_entity: str | None = None
    """the wandb user or team; None uses your default entity"""
    progress: bool = True
    """draw a live progress bar (switched off by itself when stderr is not a terminal)"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"LoggingConfig.wandb_mode={self.wandb_mode!r} is not one of {WANDB_MODES}; "
                "use 'offline' to log with no network and `wandb sync` the run later"
            )


class MetricsLogger:
    """Appends every `log` call to `run_dir/metrics.jsonl` and forwards it to the enabled sinks.

    Use it as a context manager so the sinks are closed (and a wandb run marked failed) even when
    training raises. `step` should not decrease between calls: wandb drops points logged at a
    step lower than one it has seen. Logging twice at the same step (train metrics, then eval
    metrics) is fine everywhere.
    """

    def __init__(self, run_dir: Path, config: LoggingConfig, run_name: str, run_config: dict[str, Any]):
        config.validate()
        self.run_dir = Path(run_dir)
        self.config = config
        # Resolve the optional imports before opening anything, so a missing extra fails fast and
        # leaves no half-open sinks behind.
        summary_writer_cls = _import_summary_writer() if config.tensorboard else None
        wandb = _import_wandb() if config.wandb else None

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append, not truncate: a resumed run keeps the lines logged before it stopped.
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb_writer = None
        self._wandb_run = None
        if summary_writer_cls is not None:
            self._tb_writer = summary_writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            config_json = json.dumps(run_config, indent=2, default=str)
            self._tb_writer.add_text("run_config", f"```\n{config_json}\n```", global_step=0)
        if wandb is not None:
            self._wandb_run = wandb.init(
                project=config.wandb_project,
                entity=config.wandb_entity,
                name=run_name,
                config=run_config,
                dir=str(self.run_dir),
                mode=config.wandb_mode,
                # Each logger owns its own run, so two loggers in one process (tests, sweeps)
                # never write into each other's run.
                reinit="create_new",
            )
        self._closed = False

    def log(self, metrics: dict[str, float | int], step: int) -> None:
        """Record `metrics` at `step`. Values may be Python numbers or 0-d tensors/arrays."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        for reserved in ("step", NONFINITE_KEY):
            if reserved in metrics:
                raise ValueError(f"{reserved!r} is a reserved key of metrics.jsonl rows")
        values = {key: _to_number(key, value) for key, value in metrics.items()}
        # allow_nan=False proves the line is strict JSON: every NaN/inf became null (named in "nonfinite").
        self._file.write(json.dumps(json_record(values, step), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb_writer is not None:
            for key, value in values.items():
                self._tb_writer.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The records in `run_dir/metrics.jsonl`, in logged order, with NaN/inf restored as floats.

    A last line cut short (the process was killed mid-write) is skipped with a warning; a bad line
    anywhere else means the file is corrupt and raises.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a winnow run directory?")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping a truncated last line: {line[:80]!r}")
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {line[:80]!r}") from None
        nonfinite = record.pop(NONFINITE_KEY, None) or {}
        records.append({**record, **{k: _STR_TO_NONFINITE[v] for k, v in nonfinite.items()}})
    return records


def json_record(values: dict[str, float | int], step: int) -> dict[str, Any]:
    """One metrics.jsonl row: the step, the values with NaN/inf as null, and (when there are any) the
    `nonfinite` object naming what each null was."""
    nonfinite = {key: _NONFINITE_TO_STR[repr(float(v))] for key, v in values.items()
                 if isinstance(v, float) and not math.isfinite(v)}
    record: dict[str, Any] = {"step": int(step), **{key: None if key in nonfinite else v for key, v in values.items()}}
    if nonfinite:
        record[NONFINITE_KEY] = nonfinite
    return record


def _to_number(key: str, value: Any) -> float | int:
    if hasattr(value, "item"):  # torch/numpy scalars; a CUDA tensor syncs here
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            'LoggingConfig.tensorboard=True but tensorboard is not installed: pip install "winnow[tensorboard]"'
        ) from e
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError('LoggingConfig.wandb=True but wandb is not installed: pip install "winnow[wandb]"') from e
    return wandb
