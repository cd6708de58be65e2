"""Engines: what the Actor samples with (`hf` embedded; `vllm` as an extra)."""
from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from winnow.lazy import lazy_import
from winnow.engines.base import Engine
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

torch = lazy_import("torch")

ENGINE_BACKENDS = ("hf", "vllm")
"""the values of `TrainConfig.engine_backend`"""


def make_engine(
    backend: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    hf: HFEngineConfig | None = None,
    vllm: VLLMEngineConfig | None = None,
    device: torch.device | str | None = None,
    copy_model: bool = True,
) -> Engine:
    """The engine `backend` names, holding the same weights as `model` (the learner's policy).

    `hf` copies `model` in memory (or takes it over with copy_model=False); `vllm` loads its own copy from `model_path` (the checkpoint the policy was
    loaded from: a hub id or a folder), so the learner must not have changed the weights before the first
    sync. vLLM is imported only when `backend == "vllm"`.
    """
    if backend == "hf":
        return HFEngine(model, tokenizer, hf, device=device, copy_model=copy_model)
    if backend == "vllm":
        if model_path is None:
            raise ValueError("the vllm engine loads the policy from disk: give model_path (--model.path)")
        return VLLMEngine(model_path, tokenizer, vllm, tokenizer_path=tokenizer_path)
    raise ValueError(f"unknown engine backend {backend!r}; use one of: {', '.join(ENGINE_BACKENDS)}")


__all__ = ["ENGINE_BACKENDS", "Engine", "HFEngine", "HFEngineConfig", "VLLMEngine", "VLLMEngineConfig", "make_engine"]
