"""Learning-curve PNGs from a run's `metrics.jsonl`, with no server and no notebook.

`plot_run` draws one figure per metric group (the key's first slash component: `eval/*`,
`reward/*`, `train/*`, ...; keys without a slash go to `misc`) plus a `summary.png` of the curves
one looks at first. `plot_runs` overlays one metric from several runs, to compare algorithms.

We draw on `matplotlib.figure.Figure` with an Agg canvas rather than through pyplot: this never
switches the process-wide backend (the caller may be a notebook or a GUI) and holds no global
figure state, so it is safe to call from a training process.

The x axis is any numeric column: `step`, or a cumulative counter such as `samples` or
`oracle_queries` (found bare or under `counts/`, where the runtime logs them). Counters are the
fairer axis when algorithms spend samples or oracle calls at different rates per step. A row that
lacks the x column (say, eval metrics logged in their own call) takes the last value seen before
it, which is right for counters that only grow.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any


from winnow.logging.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"
SUMMARY_FILE = "summary.png"
MISC_GROUP = "misc"
COUNTS_PREFIX = "counts/"
_MARKER_MAX_POINTS = 60  # draw dots on sparse series (eval every N steps) so lone points show
_NUM_COLS = 3
_SUBPLOT_SIZE = (4.2, 3.0)  # inches per subplot


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None, x: str = "step") -> list[Path]:
    """Write `<group>.png` per metric group and `summary.png` to `out_dir` (default `run_dir/plots`)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    records = read_metrics(run_dir)
    x = _resolve_x(records, x, where=str(run_dir))
    series = {key: _series(records, key, x) for key in _metric_keys(records, x)}
    series = {key: xy for key, xy in series.items() if xy[0]}

    groups: dict[str, list[str]] = {}
    for key in series:
        groups.setdefault(key.split("/", 1)[0] if "/" in key else MISC_GROUP, []).append(key)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, keys in groups.items():
        title = f"{run_dir.name}: {group}" if group == MISC_GROUP else f"{run_dir.name}: {group}/*"
        paths.append(_save_grid({k: series[k] for k in keys}, x, title, out_dir / f"{_safe_name(group)}.png"))
    summary_keys = [k for k in series if k.startswith("eval/") and "accuracy" in k]
    summary_keys += [k for k in ("reward/mean",) if k in series]
    if "eval/win_rate" in series:  # preference runs: the win rate next to what training optimises
        summary_keys += [k for k in ("eval/win_rate", "train/loss", "train/pref/reward_margin", "pref/mean_margin")
                         if k in series]
    if summary_keys:
        summary = {k: series[k] for k in summary_keys}
        paths.append(_save_grid(summary, x, f"{run_dir.name}: summary", out_dir / SUMMARY_FILE))
    return paths


def plot_runs(run_dirs: Sequence[Path | str], metric: str, out: Path | str, x: str = "step") -> Path:
    """Overlay `metric` from several runs on one plot, one line per run, labelled by directory name."""
    fig, ax = _new_figure(1, 1, figsize=(7.0, 4.5))
    ax = ax[0][0]
    num_plotted = 0
    for run_dir in map(Path, run_dirs):
        records = read_metrics(run_dir)
        run_x = _resolve_x(records, x, where=str(run_dir))
        xs, ys = _series(records, metric, run_x)
        if not xs:
            warnings.warn(f"{run_dir} has no {metric!r}; left out of the plot")
            continue
        ax.plot(xs, ys, label=run_dir.name, **_marker_style(len(xs)))
        num_plotted += 1
    if num_plotted == 0:
        raise ValueError(f"none of the runs logged {metric!r}")
    ax.set(title=metric, xlabel=x)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(out))


try:  # the CLI's parser; the library (plots, configs, the runtime) imports without it
    import tyro

    # RUN_DIR is positional under tyro so the command reads `winnow plot RUN_DIR`.
    RunDirArg = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
except ImportError:
    RunDirArg = str


def plot_main(run_dir: RunDirArg, x: str = "step", out: str | None = None) -> list[Path]:
    """Plot a run's learning curves to PNGs; returns the paths (the CLI prints them).

    Args:
        run_dir: the run directory holding metrics.jsonl.
        x: the column on the x axis: step, or a counter such as samples or oracle_queries
            (looked up bare, then under counts/).
        out: the folder to write to; default RUN_DIR/plots.
    """
    return plot_run(run_dir, out_dir=out, x=x)


def _resolve_x(records: list[dict[str, Any]], x: str, where: str) -> str:
    """`x` itself, or `counts/<x>` (the runtime logs its counters there), so `x="samples"` works."""
    for column in (x, f"{COUNTS_PREFIX}{x}"):
        if any(_is_number(r.get(column)) for r in records):
            return column
    columns = sorted({k for r in records for k, v in r.items() if _is_number(v)})
    raise ValueError(f"x={x!r} is not a numeric column of {where}/metrics.jsonl; columns are {columns}")


def _metric_keys(records: list[dict[str, Any]], x: str) -> list[str]:
    """Numeric keys in order of first appearance, less the axis columns."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", x) and _is_number(value):
                keys[key] = None
    return list(keys)


def _series(records: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) at the rows where `key` is present; a row without `x` takes the last x seen."""
    xs, ys = [], []
    last_x = None
    for record in records:
        if _is_number(record.get(x)):
            last_x = record[x]
        if last_x is not None and _is_number(record.get(key)):
            xs.append(last_x)
            ys.append(record[key])
    return xs, ys


def _save_grid(series: dict[str, tuple[list[float], list[float]]], x: str, title: str, path: Path) -> Path:
    """One subplot per metric, `_NUM_COLS` to a row."""
    return _save(_grid_figure(series, x, title), path)


def _grid_figure(series: dict[str, tuple[list[float], list[float]]], x: str, title: str) -> Figure:
    num_cols = min(_NUM_COLS, len(series))
    num_rows = math.ceil(len(series) / num_cols)
    figsize = (_SUBPLOT_SIZE[0] * num_cols, _SUBPLOT_SIZE[1] * num_rows + 0.4)  # +0.4 in for the suptitle
    fig, axes = _new_figure(num_rows, num_cols, figsize)
    flat_axes = [ax for row in axes for ax in row]
    for ax, (key, (xs, ys)) in zip(flat_axes, series.items()):
        ax.plot(xs, ys, **_marker_style(len(xs)))
        ax.locator_params(nbins=5)  # drawing ticks is most of a plot's time
        _title_at_fixed_height(ax, f"{key}  (last {ys[-1]:.4g})")
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in flat_axes[len(series):]:
        ax.set_visible(False)
    fig.suptitle(title, y=1 - 0.08 / figsize[1])  # at the top edge: a first-row title raised over an offset fits below
    return fig


def _title_at_fixed_height(ax, title: str) -> None:
    """`ax`'s title at a fixed height above it: placed automatically, matplotlib measures the axis's tick labels in
    an extra pass at every draw. It goes one line higher where the y axis writes an offset or a multiplier ("1e-8",
    "+1") above the axes, which it would otherwise cover."""
    formatter = ax.yaxis.get_major_formatter()
    formatter.set_locs(ax.yaxis.get_majorticklocs())
    ax.set_title(title, fontsize=10, y=1.0, pad=18 if formatter.get_offset() else 6)


def _new_figure(num_rows: int, num_cols: int, figsize: tuple[float, float]):
    # Imported here: matplotlib takes ~0.4 s to import, and a training process that logs metrics
    # but never plots should not pay it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins, not layout="constrained": the constrained solver measures every tick label in an extra
    # draw pass, which took half of a run's plotting time (11 figures: ~37 s of a tiny CPU run's 68 s).
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    height = figsize[1]
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.6 / height, top=1 - 0.75 / height, wspace=0.3, hspace=0.5)
    return fig, fig.subplots(num_rows, num_cols, squeeze=False)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _marker_style(num_points: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if num_points <= _MARKER_MAX_POINTS else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name) or MISC_GROUP
