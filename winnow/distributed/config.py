"""`--runtime ray`'s settings (`--ray.*`). Imports neither torch nor ray, so `--help` stays fast."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RayConfig:
    """Where the parts of a `--runtime ray` run live. Counts are Ray actors (one process each)."""

    address: str | None = None
    """the Ray cluster to join: "auto" (the one `ray start --head` started on this machine), HOST:PORT of its
    head, or None to start a private Ray on this machine for the run"""
    placement: Literal["colocated", "split"] = "colocated"
    """"colocated": every worker holds an engine replica and a learner rank (the engine sleeps while the learner
    trains; sync is an in-process copy); "split": engine replicas and learner ranks are separate workers, and
    learner rank 0 broadcasts the weights to every replica"""
    num_replicas: int = 2
    """engine replicas (split placement); each iteration's prompts are split across them"""
    num_learner_ranks: int = 2
    """learner ranks, one torch.distributed process each (with colocated placement also the number of engine
    replicas); more than 1 needs --learner.strategy fsdp2 or deepspeed"""
    gpus_per_worker: float = 0.0
    """GPUs each worker (replica or rank) holds: 1 on a GPU cluster, 0 on CPU"""
    cpus_per_worker: float = 1.0
    """CPU cores Ray reserves for each worker (replica, rank, oracle worker)"""
    num_cpus: int | None = None
    """CPU cores of the private Ray this run starts (address None); None lets Ray count them"""
    num_oracle_workers: int = 0
    """reward functions run in this many CPU Ray actors, each scoring a slice of the samples; 0 scores in the
    driver (a remote oracle service, `--oracle.remote.url`, is always called from the driver)"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """how the workers' placement group spreads over nodes (Ray's names): PACK fills a node first, SPREAD
    spreads them over the nodes, STRICT_SPREAD puts each on its own node"""
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """split placement: the process group of the weight broadcast; "auto" is nccl with GPUs, gloo without"""
    max_replica_restarts: int = 3
    """engine replicas that die during a run are restarted, re-synced and their prompts regenerated; after this
    many restarts the run stops"""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_learner_ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--ray.{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.num_oracle_workers < 0:
            raise ValueError(f"--ray.num-oracle-workers {self.num_oracle_workers} must be >= 0")

    @property
    def num_engine_replicas(self) -> int:
        """Engine replicas of the run: one per learner rank when colocated."""
        return self.num_learner_ranks if self.placement == "colocated" else self.num_replicas

    @property
    def num_workers(self) -> int:
        """Ray actors holding an engine or a learner rank (the placement group's bundles)."""
        return self.num_learner_ranks + (self.num_replicas if self.placement == "split" else 0)
