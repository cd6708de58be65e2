"""The learner: logprobs, losses applied, optimizer steps; distribution lives in its `Strategy`."""
from winnow.learner.batch import make_sft_batch, make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.strategy import STRATEGIES, SingleDevice, Strategy, StrategyConfig
from winnow.learner.sync import SyncConfig, SyncError, iter_buckets, sync_weights, verify_sync

__all__ = ["Learner", "LearnerConfig", "STRATEGIES", "SingleDevice", "Strategy", "StrategyConfig", "SyncConfig",
           "SyncError", "iter_buckets", "make_sft_batch", "make_train_batch", "selective_logprobs",
           "sequence_logprobs", "sync_weights", "verify_sync"]


def __getattr__(name: str):
    """The logprob functions, imported on first use: their module defines a torch.autograd.Function, and
    `winnow COMMAND --help` imports this package without torch."""
    if name in ("selective_logprobs", "sequence_logprobs"):
        from winnow.learner import logprobs

        return getattr(logprobs, name)
    raise AttributeError(f"module 'winnow.learner' has no attribute {name!r}")
