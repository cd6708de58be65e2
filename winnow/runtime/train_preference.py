"""Moved to `winnow.recipes.preference` (kept importable from here for one release)."""
from winnow.loops.config import PairConfig, WinRateConfig
from winnow.recipes.preference import PreferenceTrainConfig, train_preference

__all__ = ["PairConfig", "PreferenceTrainConfig", "WinRateConfig", "train_preference"]
