"""Run logging: metrics.jsonl (always), TensorBoard and wandb (opt-in), progress bars, plots.

Named `winnow.logging`, but it never shadows the standard library: absolute imports of `logging`
elsewhere still get Python's module.
"""
from winnow.logging.metrics import LoggingConfig, MetricsLogger, read_metrics
from winnow.logging.plot import plot_main, plot_run, plot_runs
from winnow.logging.progress import progress

__all__ = ["LoggingConfig", "MetricsLogger", "read_metrics", "progress", "plot_run", "plot_runs", "plot_main"]
