"""Moved to `winnow.recipes.rl` (kept importable from here for one release)."""
from winnow.recipes.rl import TrainConfig, train

__all__ = ["TrainConfig", "train"]
