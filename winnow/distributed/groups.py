"""The loop's seam (`winnow.loops.seam`) over Ray workers: an actor group of engine replicas and a learner group
of ranks. The driver holds no model: it shards prompts, gathers completions, and sends each iteration's batch.

Generation is split, not repeated: the call's prompts are cut into one contiguous shard per replica, each shard
sampled with its prompts' own seeds (`SamplingParams.prompt_seeds`, derived from the call's seed exactly as one
engine derives them), and the completions concatenated in shard order, which is prompt order. Because a
sample's randomness depends only on (its prompt's seed, its index, the decode step), 1 replica, N replicas and
the local runtime draw the same samples.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator

import torch

from winnow.distributed.runtime import RayRuntime, WorkerDied, get_all
from winnow.engines.sampling import prompt_seeds
from winnow.learner.sync import SyncConfig, SyncError
from winnow.types import Completion, SamplingParams, TrainBatch

log = logging.getLogger(__name__)


class LearnerRankDiedError(RuntimeError):
    """A learner rank's worker died: the ranks' collectives cannot go on, so the run stops."""

    def __init__(self, rank: int, cause: BaseException, advice: str = ""):
        super().__init__(f"learner rank {rank} died ({type(cause).__name__})" + (f"; {advice}" if advice else ""))
        self.rank = rank


class ReplicaRestartsExhaustedError(RuntimeError):
    """Engine replicas died more often than `--ray.max-replica-restarts` allows."""


def shard_bounds(num_prompts: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering `num_prompts`, as even as possible, the larger ones first;
    empty ranges (more shards than prompts) are left out."""
    size, extra = divmod(num_prompts, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        stop = start + size + (i < extra)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


class RayLearnerGroup:
    """The loop's learner: M ranks in Ray workers. Each iteration's whole batch goes to every rank, which
    trains on its own rows (`Learner.shard`) with the global normalisers, so the steps are those of one
    process training the whole batch (see `winnow.learner.learner`)."""

    def __init__(self, runtime: RayRuntime, skeleton: torch.nn.Module, config, temperature: float):
        self.runtime = runtime
        self.model = skeleton
        """the policy's shapes on the meta device (no weights): sizes for the checkpoint's free-space check"""
        self.config, self.temperature = config, temperature
        self.ref_model = None  # each rank holds its own reference
        self.num_steps = 0
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return True  # the driver logs, evaluates and writes files

    def shard(self, batch: TrainBatch, rows_per_unit: int = 1) -> TrainBatch:
        return batch  # every rank gets the whole batch and takes its own rows

    def forward_ahead(self, batch: TrainBatch, rows_per_unit: int = 1) -> None:
        """None: the ranks get the batch with its advantages, in one call (`train_policy`)."""
        return None

    def train_policy(self, batch: TrainBatch, loss_fn, needs_reference: bool = False, on_mini_batch=None,
                     rows_per_unit: int = 1, ahead=None) -> dict[str, float]:
        import ray

        # PPO's critic step (`CriticStep`) runs on each rank with that rank's critic: only its loss travels.
        value_loss = None if on_mini_batch is None else on_mini_batch.value_loss
        batch_ref = ray.put(batch.to("cpu"))
        results = self._call("train", batch_ref, loss_fn, needs_reference, rows_per_unit, value_loss)
        metrics, self.num_steps = results[0]
        return metrics

    def logprobs(self, model, batch: TrainBatch) -> torch.Tensor:
        """Per-token logprobs of `batch` under the ranks' policy [B, T] (`model` is this group's skeleton, which
        stands for it: the weights live on the ranks)."""
        if model is not self.model:
            raise ValueError("the Ray learner group computes logprobs under its ranks' policy only")
        return self._call("policy_logprobs", batch.to("cpu"), False)[0]

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self._call("policy_logprobs", batch.to("cpu"), True)[0]

    def named_weights(self, gather_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        raise TypeError("the Ray learner group's weights stay on its ranks: the actor group syncs them")

    def save_checkpoint(self, path: str | Path) -> Path:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._call("save_checkpoint", str(path))
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.num_steps = self._call("load_checkpoint", str(path))[0]

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """The trained policy as a `transformers` checkpoint (written by rank 0; the run directory must be on
        storage every node sees)."""
        self._call("save", str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return Path(path)

    def _call(self, method: str, *args) -> list:
        """`method(*args)` on every rank at once; a rank that dies stops the run, naming the rank."""
        try:
            return get_all([getattr(rank, method).remote(*args) for rank in self.runtime.ranks])
        except WorkerDied as e:
            raise LearnerRankDiedError(e.index, e.cause) from e


class RayCriticGroup:
    """PPO's critic on Ray: each learner rank holds a critic beside its policy (built by the worker) and trains
    it after each of its policy steps (`RayLearnerGroup.train_policy`); this handle values batches and saves
    the critics for the loop."""

    def __init__(self, learners: RayLearnerGroup):
        self.learners = learners
        self.model = learners.model  # for the checkpoint's free-space estimate: the policy's size
        self.device = torch.device("cpu")

    def predict(self, batch: TrainBatch) -> torch.Tensor:
        return self.learners._call("critic_values", batch.to("cpu"))[0]

    def save_checkpoint(self, path: str | Path) -> Path:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.learners._call("save_critic_checkpoint", str(path))
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.learners._call("load_critic_checkpoint", str(path))

    def save(self, path: str | Path) -> Path:
        self.learners._call("save_critic", str(path))
        return Path(path)


class RayActorGroup:
    """The loop's actor: N engine replicas. Prompts are split across them; weights reach them in-process
    (colocated) or by learner rank 0's broadcast (split); a replica that dies is restarted, re-synced and its
    shard generated again, so no sample is lost or drawn twice."""

    def __init__(self, runtime: RayRuntime):
        self.runtime = runtime
        self.is_colocated = runtime.config.placement == "colocated"
        self.num_restarts = 0
        self._sync_config: SyncConfig | None = None
        self._broadcast_ready = False
        self._engine_dtype: str | None = None

    @property
    def replicas(self) -> list:
        return self.runtime.replicas

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        seeds = prompt_seeds(params, len(prompts))
        bounds = shard_bounds(len(prompts), len(self.replicas))
        shards = [(prompts[a:b], dataclasses.replace(params, seed=None, prompt_seeds=seeds[a:b])) for a, b in bounds]
        results: list[list[Completion] | None] = [None] * len(shards)
        pending = list(range(len(shards)))
        while pending:
            refs = [self.replicas[i].generate.remote(*shards[i]) for i in pending]
            try:
                for i, completions in zip(pending, get_all(refs)):
                    results[i] = completions
                pending = []
            except WorkerDied as e:
                self._keep_finished(pending, refs, results, dead=pending[e.index])
                self._replace(pending[e.index])
                pending = [i for i in pending if results[i] is None]  # the dead shard (and any other that died)
        return [c for shard in results for c in shard]

    @staticmethod
    def _keep_finished(pending: list[int], refs: list, results: list, dead: int) -> None:
        """After a replica died: wait for the other shards of the call and keep what they drew."""
        import ray

        for i, ref in zip(pending, refs):
            if i != dead:
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError:  # another replica died too: its shard is drawn again
                    pass

    def _replace(self, index: int) -> None:
        """A replica died: restart it and give it the learner's current weights."""
        if self.is_colocated:
            raise LearnerRankDiedError(index, RuntimeError("its colocated engine died"))
        self.num_restarts += 1
        if self.num_restarts > self.runtime.config.max_replica_restarts:
            raise ReplicaRestartsExhaustedError(
                f"engine replicas died {self.num_restarts} times (allowed: --ray.max-replica-restarts "
                f"{self.runtime.config.max_replica_restarts}); check the workers' logs (out of memory?)")
        log.warning("engine replica %d died; restarting it (restart %d)", index, self.num_restarts)
        self.runtime.restart_replica(index)
        self._leave_broadcast()
        if self._sync_config is not None:  # it starts from the initial weights: bring it to the learner's
            self._broadcast(self._sync_config)

    # ------------------------------------------------------------------ sync

    def sync(self, learner, config: SyncConfig, probe: list[list[int]], seed: int) -> dict[str, float]:
        self._sync_config = config
        if self.is_colocated:
            metrics = self._call_all(self.replicas, "sync_in_process", config.bucket_mb)[0]
        else:
            metrics = self._broadcast(config)
        if config.check_sync:
            metrics.update(self._check(learner, config, probe[: config.num_probe_prompts], seed))
        return {**metrics, "ray/replica_restarts": float(self.num_restarts)}

    def _broadcast(self, config: SyncConfig) -> dict[str, float]:
        """Split placement: learner rank 0 broadcasts to every replica (the other ranks join the gather)."""
        ranks = self.runtime.ranks
        self._join_broadcast()
        sends = [rank.send_weights.remote(config.bucket_mb, self._engine_dtype) for rank in ranks]
        receives = [replica.receive_weights.remote() for replica in self.replicas]
        try:
            return get_all(sends + receives)[0]
        except WorkerDied as e:
            if e.index < len(ranks):
                raise LearnerRankDiedError(e.index, e.cause) from e
            raise RuntimeError(f"engine replica {e.index - len(ranks)} died during the weight broadcast") from e

    def _join_broadcast(self) -> None:
        if self._broadcast_ready:
            return
        ranks = self.runtime.ranks
        host, port = get_all([ranks[0].address.remote()])[0]
        world_size = 1 + len(self.replicas)
        backend = self.runtime.config.sync_backend
        if backend == "auto":
            backend = "nccl" if self.runtime.config.gpus_per_worker > 0 else "gloo"
        members = [ranks[0]] + self.replicas
        get_all([m.join_broadcast.remote(host, port, i, world_size, backend) for i, m in enumerate(members)])
        # Weights travel in the engines' dtype when every replica holds them in the same one.
        dtypes = set(get_all([replica.engine_weight_dtype.remote() for replica in self.replicas]))
        self._engine_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self._broadcast_ready = True

    def _leave_broadcast(self) -> None:
        if self._broadcast_ready:
            members = [self.runtime.ranks[0]] + self.replicas
            get_all([m.leave_broadcast.remote() for m in members])
        self._broadcast_ready = False

    def _check(self, learner, config: SyncConfig, probe: list[list[int]], seed: int) -> dict[str, float]:
        """`--sync.check-sync` on every replica: its probe logprobs against the learner's."""
        if self.is_colocated:
            results = self._call_all(self.replicas, "verify_in_process", probe, config.check_tolerance,
                                     config.probe_max_tokens, seed)
            diffs = [(r["sync/logprob_diff_mean"], r["sync/logprob_diff_max"]) for r in results]
        else:
            params = SamplingParams(temperature=learner.temperature, max_tokens=config.probe_max_tokens, seed=seed)
            completions = self._call_all(self.replicas, "generate", probe, params)
            diffs = learner._call("probe_logprob_diffs", completions)[0]
        for i, (mean, worst) in enumerate(diffs):
            if not mean <= config.check_tolerance:
                raise SyncError(f"after the weight sync, engine replica {i}'s logprobs differ from the learner's by "
                                f"{mean:.4g} per token on average (max {worst:.4g}; tolerance "
                                f"{config.check_tolerance}): that replica is not running the learner's weights "
                                f"(a lower-precision engine may need a larger --sync.check-tolerance)")
        return {"sync/logprob_diff_mean": max(d[0] for d in diffs), "sync/logprob_diff_max": max(d[1] for d in diffs)}

    # ------------------------------------------------------------------ sleep / wake

    def sleep(self) -> None:
        """Colocated: free the engines' memory for the learner ranks on the same devices (split: nothing to
        share, the engines stay awake)."""
        if self.is_colocated:
            self._call_all(self.replicas, "sleep")

    def wake(self) -> None:
        if self.is_colocated:
            self._call_all(self.replicas, "wake")

    def _call_all(self, workers: list, method: str, *args) -> list:
        try:
            return get_all([getattr(w, method).remote(*args) for w in workers])
        except WorkerDied as e:
            if self.is_colocated:  # every colocated worker is a learner rank too
                raise LearnerRankDiedError(e.index, e.cause) from e
            raise
