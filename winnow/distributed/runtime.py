"""Start-up of a `--runtime ray` run: join (or start) Ray, reserve a placement group, start the workers.

    connect(config)                                ray.init(address): a private Ray, or the cluster `ray start` made
    RayRuntime.start(config, spec)
        placement_group([bundle] * num_workers)    one bundle per worker: cpus_per_worker, gpus_per_worker
        workers                                    colocated: M workers with an engine and a learner rank each
                                                   split: M learner ranks, then N engine replicas
        runtime.actor   (RayActorGroup)            the loop's Actor: generation split over the replicas
        runtime.learner (RayLearnerGroup)          the loop's learner: the batch sent to every rank

A replica that dies is started again in its own bundle (its resources are free again once it is gone).
"""
from __future__ import annotations

import logging
from typing import Any

from winnow.distributed.config import RayConfig
from winnow.distributed.worker import Worker, WorkerSpec

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0
"""how long to wait for the cluster to grant the placement group before saying what is missing"""


class WorkerDied(RuntimeError):
    """A worker's Ray actor died during a call; `index` is its position in the list of calls."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(f"worker {index} died: {cause}")
        self.index, self.cause = index, cause


def get_all(refs: list) -> list:
    """`ray.get` of every call, in order, raising `WorkerDied` for the first call whose actor died as soon as
    that is known (the others may be blocked in a collective that will never finish)."""
    import ray

    pending = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(i, e) from e
    return results


def connect(config: RayConfig) -> bool:
    """Join the cluster at `config.address`, or start a private Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if config.address is None:
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=True)
        return True
    ray.init(address=config.address, log_to_driver=True)
    return False


class RayRuntime:
    """The workers of one run and the seam objects the loop drives (`actor`, `learner`)."""

    def __init__(self, config: RayConfig, spec: WorkerSpec, placement_group):
        self.config, self.spec, self.placement_group = config, spec, placement_group
        self.ranks: list = []
        self.replicas: list = []

    @classmethod
    def start(cls, config: RayConfig, spec: WorkerSpec) -> "RayRuntime":
        """Reserve the placement group and start the workers (Ray must be up: `connect`)."""
        runtime = cls(config, spec, _reserve(config))
        try:
            runtime._start_workers()
        except BaseException:
            runtime.shutdown()
            raise
        return runtime

    # ------------------------------------------------------------------ workers

    def _new_worker(self, bundle_index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(Worker).options(
            num_cpus=self.config.cpus_per_worker, num_gpus=self.config.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group,
                                                                 placement_group_bundle_index=bundle_index))
        return remote.remote(self.spec)

    def _start_workers(self) -> None:
        c = self.config
        self.ranks = [self._new_worker(i) for i in range(c.num_learner_ranks)]
        colocated = c.placement == "colocated"
        self.replicas = self.ranks if colocated else [self._new_worker(c.num_learner_ranks + i)
                                                      for i in range(c.num_replicas)]
        master = get_all([self.ranks[0].address.remote()])[0]
        calls = [rank.build.remote(has_engine=colocated, learner_rank=i, num_learner_ranks=c.num_learner_ranks,
                                   master=master) for i, rank in enumerate(self.ranks)]
        if not colocated:
            calls += [replica.build.remote(has_engine=True, learner_rank=None, num_learner_ranks=c.num_learner_ranks,
                                           master=None) for replica in self.replicas]
        get_all(calls)
        log.info("ray runtime: %s placement, %d learner ranks, %d engine replicas", c.placement,
                 c.num_learner_ranks, c.num_engine_replicas)

    def restart_replica(self, index: int):
        """Start replica `index` again in its bundle (split placement); it loads the initial policy, and the
        caller syncs it."""
        import ray

        ray.kill(self.replicas[index], no_restart=True)
        replica = self._new_worker(self.config.num_learner_ranks + index)
        get_all([replica.build.remote(has_engine=True, learner_rank=None,
                                      num_learner_ranks=self.config.num_learner_ranks, master=None)])
        self.replicas[index] = replica
        return replica

    def shutdown(self) -> None:
        """Stop the workers and free the placement group."""
        import ray

        for worker in {id(w): w for w in self.ranks + self.replicas}.values():
            ray.kill(worker, no_restart=True)
        ray.util.remove_placement_group(self.placement_group)


def _reserve(config: RayConfig):
    """The placement group of the run's workers, granted (or a message saying what the cluster lacks)."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})}
    group = placement_group([dict(bundle) for _ in range(config.num_workers)], strategy=config.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ValueError(
            f"the Ray cluster cannot place {config.num_workers} workers of {bundle} ({config.placement_strategy}); "
            f"it has {ray.cluster_resources()}: lower --ray.num-learner-ranks / --ray.num-replicas, "
            f"--ray.cpus-per-worker or --ray.gpus-per-worker, or add nodes (ray start --address)")
    return group
