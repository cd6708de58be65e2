"""Learner strategies: who owns devices, sharding, gradient sync, the optimizer step and full-state gathering.

Algorithm code never sees the strategy: it computes a loss; the strategy does backward, clipping, the
optimizer and scheduler step, hands out full weights for the engine, and saves and loads checkpoints.

    single    one device (CPU or one GPU), this file
    fsdp2     torch `fully_shard` per decoder layer + root, winnow/learner/fsdp.py
    deepspeed DeepSpeed ZeRO stage 2 or 3, optional CPU offload, winnow/learner/deepspeed.py

A strategy is stateful: `setup` takes the model and factories for the optimizer and scheduler, because a
sharded strategy must build them itself (FSDP2 over sharded parameters; DeepSpeed inside its engine).

Data-parallel semantics, shared by every strategy: each rank computes the loss of its own rows with the
*global* normalisers (see `Learner`), so the sum over ranks of the local losses is the global mini-batch
loss. Data-parallel gradient reduction *averages* over ranks, so `backward` multiplies the local loss by
`world_size`: the averaged gradient is then the gradient of the global loss, the same as one process
computing it on the whole mini-batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from winnow.lazy import lazy_import

torch = lazy_import("torch")

OptimizerFactory = Callable[[Iterable["torch.nn.Parameter"]], "torch.optim.Optimizer"]
SchedulerFactory = Callable[["torch.optim.Optimizer"], "torch.optim.lr_scheduler.LRScheduler"]


@dataclass
class StrategyConfig:
    """Settings of the sharded strategies (ignored by `single`)."""

    zero_stage: int = 2
    """deepspeed: ZeRO stage, 2 (shard gradients and optimizer state) or 3 (also shard parameters)"""
    offload: bool = False
    """deepspeed: keep optimizer state (and at stage 3 the parameters) in CPU memory; saves GPU memory, costs speed"""
    mixed_precision: str = "auto"
    """fsdp2: parameter dtype in forward/backward: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16" or "float32";
    master weights, optimizer state and gradient reduction stay fp32"""
    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl on GPU, gloo on CPU), "nccl" or "gloo\""""

    def __post_init__(self) -> None:
        if self.zero_stage not in (2, 3):
            raise ValueError(f"sharding.zero_stage={self.zero_stage}: DeepSpeed ZeRO stage 2 or 3 is supported")
        if self.mixed_precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"sharding.mixed_precision={self.mixed_precision!r}: use auto, bfloat16 or float32")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"sharding.backend={self.backend!r}: use auto, nccl or gloo")


class Strategy(Protocol):
    device: torch.device
    rank: int
    """this process's data-parallel rank (0 when not distributed)"""
    world_size: int
    """data-parallel processes (1 when not distributed)"""

    def setup(
        self, model: torch.nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
        max_grad_norm: float,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Place (and shard) the model, build optimizer and scheduler; `max_grad_norm` 0 turns clipping off."""
        ...
    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def zero_grad(self) -> None: ...
    def backward(self, loss: torch.Tensor, *, is_last_micro_batch: bool) -> None: ...
    def optimizer_step(self) -> float:
        """Clip, step optimizer and scheduler; returns the global gradient norm before clipping. A non-finite
        norm skips the step (optimizer and scheduler untouched, gradients dropped)."""
        ...
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...
    def all_reduce_max(self, value: int) -> int: ...
    def full_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) weights, named as in the HF model's `named_parameters()`; every rank gets them.
        gather_dtype: a strategy that gathers sharded weights casts the floating-point shards to it first (half
        the bytes of float32 for bfloat16); one that holds them whole yields them as they are."""
        ...
    def save_pretrained(self, path: Path) -> None: ...
    def save_checkpoint(self, path: Path, client_state: dict) -> None: ...
    def load_checkpoint(self, path: Path) -> dict: ...


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class SingleDevice:
    """Everything on one device (CPU or one GPU). Weights stay fp32; bf16 comes from autocast on GPU."""

    rank, world_size = 0, 1

    def __init__(self, device: torch.device | str | None = None, config: StrategyConfig | None = None):
        self.device = torch.device(device) if device is not None else default_device()

    def setup(self, model, make_optimizer, make_scheduler, max_grad_norm):
        self.max_grad_norm = max_grad_norm
        self.model = model.to(self.device, dtype=torch.float32)
        self.optimizer = make_optimizer(trainable(self.model))
        self.scheduler = make_scheduler(self.optimizer)
        return self.model, self.optimizer, self.scheduler

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        model.requires_grad_(False)
        return model.eval()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *, is_last_micro_batch: bool) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        grad_norm = clip_grad_norm(self.model, self.max_grad_norm)
        if not torch.isfinite(grad_norm):  # never applied: the learner counts it as skipped
            self.zero_grad()
            return float(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def all_reduce_max(self, value: int) -> int:
        return value

    def full_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.model.named_parameters():  # nothing to gather: the receiver casts
            yield name, param.detach()

    def save_pretrained(self, path: Path) -> None:
        self.model.save_pretrained(path)

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client_state": client_state}
        torch.save(state, path / "checkpoint.pt")

    def load_checkpoint(self, path: Path) -> dict:
        state = torch.load(path / "checkpoint.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm before clipping; clips to `max_norm` unless it is 0.

    With FSDP2 the gradients are DTensor shards: the norm of each is a partial result that `full_tensor()`
    reduces over ranks (torchtitan's `clip_grad_norm_` does the same), so every rank clips by the global norm.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
    return total


class DataParallel:
    """Rank bookkeeping and the small collectives every sharded strategy shares (torch.distributed)."""

    def __init__(self, device: torch.device | str | None = None, config: StrategyConfig | None = None):
        import torch.distributed as dist

        self.config = config or StrategyConfig()
        self.device = init_process_group(self.config, device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.to(self._comm_device)
        dist.all_reduce(values)
        return values.cpu()

    def all_reduce_max(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference stays whole on every rank: it has no optimizer state to shard."""
        return model.to(self.device).requires_grad_(False).eval()


def init_process_group(config: StrategyConfig, device: torch.device | str | None) -> torch.device:
    """Join the torchrun process group (RANK, WORLD_SIZE, MASTER_ADDR... from the environment) once.

    Returns this rank's device: cuda:LOCAL_RANK on GPU, cpu otherwise. A single process without torchrun
    becomes a world of one, so sharded strategies also run (and are tested) in one process.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend=backend)
    return local


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STRATEGIES: dict[str, str | type] = {
    "single": SingleDevice,
    "fsdp2": "winnow.learner.fsdp:FSDP2Strategy",
    "deepspeed": "winnow.learner.deepspeed:DeepSpeedStrategy",
}
"""strategy classes by name; sharded ones are "module:Class" strings, imported on first use"""


def make_strategy(
    name: str, device: torch.device | str | None = None, config: StrategyConfig | None = None
) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"learner.strategy={name!r} is not available; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    if isinstance(cls, str):
        import importlib

        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls(device, config or StrategyConfig())
