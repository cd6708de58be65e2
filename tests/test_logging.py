"""winnow.logging: metrics.jsonl round trip, TensorBoard and offline wandb sinks, plots, progress bar."""
from __future__ import annotations

import io
import json
import math
import sys

import pytest
from matplotlib.image import imread

from winnow.logging import LoggingConfig, MetricsLogger, plot_main, plot_run, plot_runs, progress, read_metrics


def _log_fake_run(run_dir, num_steps=10, eval_every=3):
    """A small run: train/* and reward/* every step, eval/* every `eval_every` steps in its own call.

    samples grows by 8 a step, so at step s it is 8 * (s + 1); eval rows carry no `samples`.
    """
    with MetricsLogger(run_dir, LoggingConfig(), "fake", {}) as logger:
        for step in range(num_steps):
            metrics = {"train/loss": 1.0 / (step + 1), "reward/mean": step / num_steps, "samples": 8 * (step + 1)}
            logger.log(metrics, step)
            if step % eval_every == 0:
                logger.log({"eval/gsm8k_accuracy": 0.1 * step}, step)
    return run_dir


def test_jsonl_round_trip_values(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), "run", {"lr": 1e-5}) as logger:
        logger.log({"loss/policy": 0.25, "samples": 64, "train/clipped": True}, step=1)
        logger.log({"eval/accuracy": 0.5}, step=2)
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss/policy": 0.25, "samples": 64, "train/clipped": 1},  # bool stored as 0/1
        {"step": 2, "eval/accuracy": 0.5},
    ]


def test_each_line_is_on_disk_before_close(tmp_path):
    # A crash after log() returns must lose nothing: the line is flushed, not buffered.
    logger = MetricsLogger(tmp_path, LoggingConfig(), "run", {})
    logger.log({"reward/mean": 0.75}, step=3)
    assert read_metrics(tmp_path) == [{"step": 3, "reward/mean": 0.75}]
    logger.close()
    logger.close()  # idempotent


def test_tensor_scalars_are_logged_as_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path, LoggingConfig(), "run", {}) as logger:
        logger.log({"loss/policy": torch.tensor(0.5)}, step=0)
    assert read_metrics(tmp_path) == [{"step": 0, "loss/policy": 0.5}]


def test_nonfinite_floats_are_null_in_strict_json_named_apart_and_read_back(tmp_path):
    import pandas as pd

    with MetricsLogger(tmp_path, LoggingConfig(), "run", {}) as logger:
        logger.log({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5}, step=0)
        logger.log({"a": 0.25, "b": 2.0, "c": 1.0, "d": 0.5}, step=1)
    text = (tmp_path / "metrics.jsonl").read_text()
    first = text.splitlines()[0]
    # Strict JSON (no bare NaN tokens): parse_constant is called only for NaN/Infinity tokens.
    raw = json.loads(first, parse_constant=lambda token: pytest.fail(f"bare {token} in {first}"))
    assert raw == {"step": 0, "a": None, "b": None, "c": None, "d": 1.5,
                   "nonfinite": {"a": "NaN", "b": "Infinity", "c": "-Infinity"}}
    assert "nonfinite" not in json.loads(text.splitlines()[1])  # only rows that have one carry it
    # pandas reads the columns as numbers (null -> NaN), not as strings
    frame = pd.read_json(tmp_path / "metrics.jsonl", lines=True)
    assert all(frame[k].dtype == "float64" for k in "abcd")
    assert frame["a"].isna().tolist() == [True, False] and frame["b"].tolist()[1] == 2.0
    record, _ = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf
    assert set(record) == {"step", "a", "b", "c", "d"}


def test_bad_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), "run", {}) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"step": 1}, step=1)
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"nonfinite": 1}, step=1)
        with pytest.raises(TypeError, match="train/name"):
            logger.log({"train/name": "abc"}, step=1)


def test_truncated_last_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "x": 1}\n{"step": 1, "x"')
    with pytest.warns(UserWarning, match="truncated"):
        assert read_metrics(tmp_path) == [{"step": 0, "x": 1}]


def test_tensorboard_scalars_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), "run", {"lr": 1e-5}) as logger:
        logger.log({"reward/mean": 0.5}, step=1)
        logger.log({"reward/mean": 0.75}, step=2)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    events = accumulator.Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(1, 0.5), (2, 0.75)]


def test_wandb_offline_writes_run_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Keep wandb's caches and settings inside the test's folder, not the user's home.
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    config = LoggingConfig(wandb=True, wandb_mode="offline")
    with MetricsLogger(run_dir, config, "offline-test", {"lr": 1e-5}) as logger:
        logger.log({"reward/mean": 0.5}, step=1)
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb")), f"no .wandb file in {offline_run}"
    assert read_metrics(run_dir) == [{"step": 1, "reward/mean": 0.5}]


def test_unknown_wandb_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="wandb_mode='offlne'.*offline"):
        LoggingConfig(wandb=True, wandb_mode="offlne")


@pytest.mark.parametrize(
    ("sink", "module", "extra"),
    [("wandb", "wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard", "tensorboard")],
)
def test_missing_extra_names_the_pip_install(tmp_path, monkeypatch, sink, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf'pip install "winnow\[{extra}\]"'):
        MetricsLogger(tmp_path, LoggingConfig(**{sink: True}), "run", {})
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before opening anything


def _assert_png(path):
    image = imread(path)  # [H, W, channels]
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_run_writes_one_png_per_group_and_summary(tmp_path):
    run_dir = _log_fake_run(tmp_path / "grpo")
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["train.png", "reward.png", "misc.png", "eval.png", "summary.png"]
    assert all(p.parent == run_dir / "plots" for p in paths)
    for path in paths:
        _assert_png(path)


def test_plot_run_with_samples_on_x(tmp_path):
    run_dir = _log_fake_run(tmp_path / "grpo")
    paths = plot_run(run_dir, out_dir=tmp_path / "by_samples", x="samples")
    # `samples` is now the axis, so no misc figure; eval rows took samples from their step's row.
    assert [p.name for p in paths] == ["train.png", "reward.png", "eval.png", "summary.png"]
    for path in paths:
        _assert_png(path)


def test_plot_x_finds_runtime_counters_under_counts(tmp_path):
    with MetricsLogger(tmp_path, LoggingConfig(), "run", {}) as logger:
        for step in range(3):
            logger.log({"reward/mean": 0.5, "counts/oracle_queries": 16.0 * (step + 1)}, step)
    paths = plot_run(tmp_path, x="oracle_queries")  # counts/oracle_queries is the axis, not a figure
    assert [p.name for p in paths] == ["reward.png", "summary.png"]
    for path in paths:
        _assert_png(path)


def test_plot_missing_x_column_is_a_clear_error(tmp_path):
    run_dir = _log_fake_run(tmp_path / "grpo")
    with pytest.raises(ValueError, match="x='oracle_queries'.*samples"):
        plot_run(run_dir, x="oracle_queries")


@pytest.mark.parametrize("num_rows", [1, 4])
def test_a_title_clears_the_offset_text_of_its_y_axis_and_the_figure_title(num_rows):
    # Titles sit at a fixed height (no measuring pass at draw): one line higher where the y axis writes an offset
    # above the axes, as matplotlib does for a series constant to 1e-9, so the two never overlap; nor does the
    # raised title of the first row overlap the figure's title.
    from winnow.logging.plot import _grid_figure

    # the near-constant one in the middle column, under the figure's title
    series = {"train/plain_metric_with_a_long_name": ([1, 2], [0.25, 0.75]),
              "train/near_constant_metric_name": ([1, 2], [1.0 + 3e-9, 1.0 + 8e-9])}
    series.update({f"train/more_{i}": ([1, 2], [i, i + 1.0]) for i in range(3 * num_rows - 2)})
    fig = _grid_figure(series, "step", "run: train/*")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    plain, near_constant = fig.axes[:2]
    offset = near_constant.yaxis.get_offset_text()
    assert offset.get_text() and not plain.yaxis.get_offset_text().get_text()
    title_box = near_constant.title.get_window_extent(renderer)
    assert not title_box.overlaps(offset.get_window_extent(renderer))
    assert not title_box.overlaps(fig._suptitle.get_window_extent(renderer))
    assert title_box.y1 <= fig.bbox.y1  # inside the figure
    assert title_box.y0 > plain.title.get_window_extent(renderer).y0  # the plain one stays close to its axes


def test_plot_runs_overlays_runs(tmp_path):
    runs = [_log_fake_run(tmp_path / "grpo"), _log_fake_run(tmp_path / "dpo", num_steps=6)]
    out = plot_runs(runs, "eval/gsm8k_accuracy", tmp_path / "compare.png", x="samples")
    _assert_png(out)
    with pytest.warns(UserWarning, match="has no 'eval/nope'"), pytest.raises(ValueError, match="none of the runs"):
        plot_runs(runs, "eval/nope", tmp_path / "nope.png")


def test_plot_main_takes_cli_strings(tmp_path):
    run_dir = _log_fake_run(tmp_path / "grpo")
    paths = plot_main(str(run_dir), x="samples", out=str(tmp_path / "out"))
    assert paths and all(p.parent == tmp_path / "out" and p.exists() for p in paths)


def test_progress_disabled_still_iterates_and_takes_postfix():
    bar = progress(range(3), "train", enabled=False)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(reward=0.5, accuracy=0.25)
    bar.close()
    with progress(5, "sft", enabled=False) as bar:
        bar.update(2)
        bar.set_postfix(loss=1.0)


def test_progress_off_when_not_a_tty():
    stream = io.StringIO()
    with progress(4, "eval", enabled=True, file=stream) as bar:
        bar.update(4)
    assert bar.disable and stream.getvalue() == ""


def test_an_iteration_that_compiles_logs_its_compile_seconds(tmp_path):
    """time/compile: the seconds torch.compile took inside an iteration (the first one compiles, the second
    reuses the graph and logs none), at most that iteration's wall time."""
    import torch

    from winnow.eval.accuracy import EvalResult
    from winnow.loops.base import Counters, Loop

    double = torch.compile(lambda x: x * 2 + 1, backend="eager")

    class Family:
        counters = Counters()

        def collect(self, iteration, timer):
            with timer("generate"):
                double(torch.ones(3))
            return None, {}

        def evaluate(self):
            return EvalResult({}, [])

    class Learner:
        num_steps, is_main = 0, True

    class Logger:
        def log(self, row, step):
            pass

    loop = Loop(Family(), learner=Learner(), actor=None, num_iterations=2, eval_every=0, logger=Logger(),
                run_dir=tmp_path, max_idle_iterations=10)
    torch._dynamo.reset()
    first, second = loop.step(1), loop.step(2)
    assert 0 < first["time/compile"] <= first["time/generate"]
    assert "time/compile" not in second
