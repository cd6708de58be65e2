"""Learner strategies: who owns devices, sharding, gradient sync and full-state gathering.

Algorithm code never sees the strategy: it computes a loss; the strategy does backward, clipping, the
optimizer step, and hands out full weights for the engine and for checkpoints. `single` is one device;
sharded strategies (FSDP2, DeepSpeed ZeRO) plug in through the same protocol.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import torch


class Strategy(Protocol):
    device: torch.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor: ...
    def step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]: ...
    def save_pretrained(self, model: torch.nn.Module, path: Path) -> None: ...


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class SingleDevice:
    """Everything on one device (CPU or one GPU). Weights stay fp32; bf16 comes from autocast on GPU."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device, dtype=torch.float32)

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        model.requires_grad_(False)
        return model.eval()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm <= 0:
            norms = [p.grad.detach().norm() for p in params]
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            yield name, param.detach()

    def save_pretrained(self, model: torch.nn.Module, path: Path) -> None:
        model.save_pretrained(path)


STRATEGIES = {"single": SingleDevice}


def make_strategy(name: str, device: torch.device | str | None = None) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(
            f"learner.strategy={name!r} is not available; choose one of {sorted(STRATEGIES)} "
            "(sharded strategies need their extras installed)"
        )
    return STRATEGIES[name](device)
