"""`deepspeed`: DeepSpeed ZeRO stage 2 or 3, one process per device under `torchrun`; `pip install "winnow[deepspeed]"`.

ZeRO-2 shards gradients and optimizer state; ZeRO-3 also shards the parameters, gathered layer by layer
in forward and backward by hooks on every submodule. `offload` keeps the optimizer state (and at stage 3
the parameters) in CPU memory. The DeepSpeed engine owns the optimizer and the scheduler: it wraps the
learner's AdamW (built by the learner's factory, so `single`, `fsdp2` and `deepspeed` share one optimizer
definition) and steps the scheduler itself, and its `step()` does clipping, the optimizer step and
zeroing gradients. Gradient accumulation is driven by the learner: the accumulation boundary is set by
hand on the last micro-batch, so DeepSpeed's own `gradient_accumulation_steps` stays 1.

The pure-PyTorch AdamW is used even with offload (`zero_force_ds_cpu_optimizer: false`): DeepSpeed's
CPU Adam is faster but JIT-compiles a C++ op on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from winnow.learner.strategy import DataParallel, trainable

try:
    import deepspeed
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'learner.strategy="deepspeed" needs DeepSpeed: pip install "winnow[deepspeed]"'
    ) from error


class DeepSpeedStrategy(DataParallel):
    """Data parallelism with DeepSpeed ZeRO; see the module docstring."""

    def setup(self, model, make_optimizer, make_scheduler, max_grad_norm):
        model = model.to(self.device, dtype=torch.float32)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable(model), optimizer=make_optimizer,
            lr_scheduler=make_scheduler, config=self.ds_config(max_grad_norm), dist_init_required=False,
        )
        return self.engine, self.optimizer, self.scheduler

    def ds_config(self, max_grad_norm: float) -> dict:
        """The DeepSpeed config this strategy runs with (batch sizes are placeholders: the learner batches)."""
        stage, offload = self.config.zero_stage, self.config.offload
        zero: dict = {"stage": stage}
        if offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        dtype = self.config.mixed_precision
        is_bf16 = dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda")
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": zero,
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": is_bf16},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, *, is_last_micro_batch: bool) -> None:
        # ZeRO averages gradients over ranks; loss x world_size makes it the gradient of the global loss.
        self.engine.set_gradient_accumulation_boundary(is_last_micro_batch)
        self.engine.backward(loss * self.world_size)

    def optimizer_step(self) -> float:
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return float(grad_norm) if grad_norm is not None else float("nan")

    def full_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """ZeRO-2 keeps whole parameters on every rank; ZeRO-3 gathers each one (on every rank) in turn, in its
        own dtype (`gather_dtype` is not applied: DeepSpeed gathers the partitions it holds), and the copy
        outlives the gather, whose storage is freed when the context exits."""
        for name, param in self.engine.module.named_parameters():
            if self.config.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param]):
                    tensor = param.detach().clone()
            else:
                tensor = param.detach()
            yield name, tensor

    def save_pretrained(self, path: Path) -> None:
        state = {name: tensor.cpu() for name, tensor in self.full_weights()}
        if self.rank == 0:
            self.engine.module.save_pretrained(path, state_dict=state)
        dist.barrier()

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(path), tag="checkpoint", client_state=client_state)

    def load_checkpoint(self, path: Path) -> dict:
        loaded, client_state = self.engine.load_checkpoint(str(path), tag="checkpoint")
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path} (tag 'checkpoint')")
        return client_state
