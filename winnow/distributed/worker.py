"""One Ray actor of a `--runtime ray` run: an engine replica, a learner rank, or both (colocated placement).

The worker builds its parts itself from a `WorkerSpec` (callables the recipe gives, pickled to the worker):
the driver never holds a model. Learner ranks join their own torch.distributed world (MASTER_ADDR/PORT of
rank 0, set before the strategy starts); the split placement's replicas and learner rank 0 also join a
separate weight-broadcast group (`winnow.distributed.broadcast`).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from winnow.distributed.broadcast import BroadcastGroup, free_address
from winnow.learner.batch import make_train_batch
from winnow.learner.sync import sync_weights, verify_sync, weight_dtype
from winnow.loops.checkpoint import rng_state, set_rng_state
from winnow.setup import resolve_device, setup_process, start_compile_workers
from winnow.types import Completion, SamplingParams, TrainBatch


@dataclass
class WorkerSpec:
    """How every worker of a run builds its parts (the same spec for replicas and ranks)."""

    load_policy: Callable[[], tuple[torch.nn.Module, Any]]
    """() -> (the policy on CPU in fp32, its tokenizer): every worker starts from the same weights"""
    make_engine: Callable[[torch.nn.Module, Any, torch.device], Any]
    """(a copy of the policy the engine may keep, tokenizer, device) -> the replica's `Engine`"""
    make_learner: Callable[[torch.nn.Module, torch.device], Any]
    """(the policy, device) -> the rank's `Learner` (its strategy joins the ranks' world)"""
    make_critic: Callable[[torch.nn.Module, torch.device], Any] | None = None
    """(the policy, device) -> PPO's critic `Learner`, built beside the learner rank; None without a critic"""
    seed: int = 0
    """the run's seed: every worker seeds its generators with it, as a local run does"""
    num_threads: int | None = None
    """torch CPU threads per worker"""
    device: str = "auto"
    """the worker's device ("auto": the GPU Ray gave it, else CPU)"""
    compiles: bool = False
    """the run torch.compiles (the engine's decode glue or the learner's layers): on a GPU the worker starts the
    compile's worker processes before it loads the policy (`winnow.setup.start_compile_workers`)"""


class Worker:
    """A Ray actor's body (wrapped with `ray.remote` by `winnow.distributed.runtime`)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.engine = self.learner = self.critic = self.tokenizer = None
        self.broadcast: BroadcastGroup | None = None
        self.learner_rank: int | None = None

    # ------------------------------------------------------------------ start-up

    def address(self) -> tuple[str, int]:
        """Where this worker can host a rendezvous (its node's IP, a free port)."""
        return free_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def build(self, *, has_engine: bool, learner_rank: int | None, num_learner_ranks: int,
              master: tuple[str, int] | None) -> None:
        """Build the engine and/or the learner rank. Every rank must build concurrently: the strategy's
        process group waits for all of them."""
        setup_process(self.spec.seed, self.spec.num_threads)
        device = resolve_device(self.spec.device)
        start_compile_workers(device, self.spec.compiles)
        policy, self.tokenizer = self.spec.load_policy()
        if has_engine:
            engine_model = copy.deepcopy(policy) if learner_rank is not None else policy
            self.engine = self.spec.make_engine(engine_model, self.tokenizer, device)
        if learner_rank is not None:
            self.learner_rank = learner_rank
            if num_learner_ranks > 1:
                os.environ.update(RANK=str(learner_rank), WORLD_SIZE=str(num_learner_ranks), LOCAL_RANK="0",
                                  MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
            if self.spec.make_critic is not None:  # before the learner: a sharded strategy splits the policy
                self.critic = self.spec.make_critic(policy, device)
            self.learner = self.spec.make_learner(policy, device)

    # ------------------------------------------------------------------ engine

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self.engine.generate(prompts, params)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    # ------------------------------------------------------------------ learner

    def train(self, batch: TrainBatch, loss_fn, needs_reference: bool, rows_per_unit: int,
              value_loss=None) -> tuple[dict, int]:
        """This rank's share of the iteration's optimizer steps: its rows of the whole batch (`Learner.shard`),
        trained with the global normalisers, each step followed by a step of this rank's critic when
        `value_loss` is given (PPO). Returns the steps' metrics (the same on every rank: they are all-reduced)
        and the learner's step count."""
        from winnow.loops.rl import CriticStep

        critic_step = CriticStep(self.critic, value_loss) if value_loss is not None else None
        metrics = self.learner.train_policy(self.learner.shard(batch, rows_per_unit), loss_fn, needs_reference,
                                            on_mini_batch=critic_step, rows_per_unit=rows_per_unit)
        return metrics, self.learner.num_steps

    def policy_logprobs(self, batch: TrainBatch, reference: bool) -> torch.Tensor:
        """Per-token logprobs of `batch` under this rank's policy (or its reference), on CPU [B, T]."""
        batch = batch.to(self.learner.device)
        if reference:
            return self.learner.reference_logprobs(batch).cpu()
        return self.learner.logprobs(self.learner.model, batch).cpu()

    def critic_values(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's critic's values of `batch`, on CPU [B, T]."""
        return self.critic.predict(batch.to(self.critic.device)).cpu()

    def save_critic_checkpoint(self, path: str) -> None:
        self.critic.save_checkpoint(Path(path))

    def load_critic_checkpoint(self, path: str) -> None:
        self.critic.load_checkpoint(Path(path))

    def save_critic(self, path: str) -> None:
        self.critic.save(Path(path))

    def save_checkpoint(self, path: str) -> None:
        """The learner's own checkpoint format (sharded under FSDP2 and DeepSpeed) and this rank's generators."""
        self.learner.save_checkpoint(Path(path))
        torch.save(rng_state(), Path(path) / f"rng_rank{self.learner_rank}.pt")

    def load_checkpoint(self, path: str) -> int:
        self.learner.load_checkpoint(Path(path))
        rng_file = Path(path) / f"rng_rank{self.learner_rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return self.learner.num_steps

    def save(self, path: str) -> None:
        """The trained policy as a `transformers` checkpoint (a gather on every rank; rank 0 writes; the driver
        adds the tokenizer)."""
        self.learner.save(Path(path))

    def num_steps(self) -> int:
        return self.learner.num_steps

    # ------------------------------------------------------------------ weight sync

    def sync_in_process(self, bucket_mb: float) -> dict[str, float]:
        """Colocated placement: this worker's learner rank hands the full weights to its own engine (every rank
        gathers: the gather is a collective)."""
        return sync_weights(self.learner, self.engine, bucket_mb)

    def verify_in_process(self, probe: list[list[int]], tolerance: float, max_tokens: int, seed: int) -> dict:
        """Colocated placement: `--sync.check-sync` on this worker's engine against its learner rank."""
        return verify_sync(self.engine, self.learner, probe, tolerance, max_tokens, seed=seed)

    def join_broadcast(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        default = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU Ray gave this worker
        device = self.learner.device if self.learner is not None else getattr(self.engine, "device", default)
        self.broadcast = BroadcastGroup(host, port, rank, world_size, backend, torch.device(device))

    def leave_broadcast(self) -> None:
        if self.broadcast is not None:
            self.broadcast.close()
        self.broadcast = None

    def send_weights(self, bucket_mb: float, dtype: str | None = None) -> dict[str, float]:
        """Split placement, on every learner rank: gather the full weights (a collective); rank 0 broadcasts
        them to the replicas, cast to `dtype` (the replicas' engine dtype) when given, gathered in it too."""
        weights = self.learner.named_weights(getattr(torch, dtype) if dtype else None)
        if self.learner_rank != 0:
            for _ in weights:  # take part in the gather; rank 0 sends
                pass
            return {}
        return self.broadcast.send(weights, int(bucket_mb * 2**20), getattr(torch, dtype) if dtype else None)

    def engine_weight_dtype(self) -> str | None:
        """The dtype this replica's engine holds its weights in ("bfloat16", ...), or None if it does not say."""
        dtype = weight_dtype(self.engine)
        return str(dtype).removeprefix("torch.") if dtype is not None else None

    def receive_weights(self) -> int:
        """Split placement, on a replica: load every bucket learner rank 0 broadcasts; returns the bucket count."""
        num_buckets = 0
        for bucket, is_last in self.broadcast.receive():
            self.engine.update_weights(bucket, is_last_bucket=is_last)
            num_buckets += 1
        return num_buckets

    def probe_logprob_diffs(self, completions_per_replica: list[list[Completion]]) -> list[tuple[float, float]]:
        """Split placement, on every learner rank: the mean and max |engine - learner| logprob of each replica's
        probe completions (the learner's forward is a collective: every rank runs it)."""
        diffs = []
        for completions in completions_per_replica:
            batch = make_train_batch(completions, torch.zeros(len(completions))).to(self.learner.device)
            learner_logprobs = self.learner.logprobs(self.learner.model, batch)
            diff = (learner_logprobs - batch.engine_logprobs).abs()[batch.response_mask.bool()]
            diffs.append((float(diff.mean()), float(diff.max())) if diff.numel() else (float("nan"),) * 2)
        return diffs
