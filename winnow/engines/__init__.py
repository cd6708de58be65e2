"""Engines: what the Actor samples with (`hf` embedded; `vllm` as an extra)."""
from winnow.engines.base import Engine
from winnow.engines.hf import HFEngine, HFEngineConfig

__all__ = ["Engine", "HFEngine", "HFEngineConfig"]
