"""Reward functions in a pool of CPU Ray actors (`--ray.num-oracle-workers K`): each worker builds the run's
oracle and scores one contiguous slice of an iteration's samples, so math grading scales out across cores and
nodes. Scores come back in the samples' order; a slice a worker could not score is None, never a zero."""
from __future__ import annotations

import time
from typing import Any, Callable

from winnow.distributed.groups import shard_bounds
from winnow.distributed.runtime import WorkerDied, get_all
from winnow.types import RewardResult


class OracleWorker:
    """A Ray actor's body: one oracle, built in the worker."""

    def __init__(self, make_oracle: Callable[[], Any]):
        self.oracle = make_oracle()

    def reward(self, prompts, completions, references, columns) -> RewardResult:
        return self.oracle.reward(prompts, completions, references, columns)

    def close(self) -> None:
        self.oracle.close()


class RayOraclePool:
    """A `RewardOracle` over K `OracleWorker`s. Metrics: counts (`.../num_...`) are summed over the workers,
    other numbers (latencies) are the slowest worker's; `oracle/latency_s` is the pool's wall time."""

    def __init__(self, make_oracle: Callable[[], Any], num_workers: int, cpus_per_worker: float = 1.0,
                 reference_rewards: list[str] | None = None):
        import ray

        self.reference_rewards = list(reference_rewards or [])
        """the rewards that compare with a reference answer (as the oracle in the workers says)"""
        actor = ray.remote(OracleWorker).options(num_cpus=cpus_per_worker)
        self.workers = [actor.remote(make_oracle) for _ in range(num_workers)]

    def reward(self, prompts: list[str], completions: list[str], references: list[str | None],
               columns: dict[str, list[Any]] | None = None) -> RewardResult:
        start = time.perf_counter()
        columns = columns or {}
        bounds = shard_bounds(len(completions), len(self.workers))
        refs = [self.workers[i].reward.remote(prompts[a:b], completions[a:b], references[a:b],
                                              {k: v[a:b] for k, v in columns.items()})
                for i, (a, b) in enumerate(bounds)]
        try:
            results = get_all(refs)
        except WorkerDied as e:
            raise RuntimeError(f"oracle worker {e.index} died while scoring; see its log") from e
        return merge_results(results, time.perf_counter() - start)

    def close(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.get(worker.close.remote())
            except ray.exceptions.RayActorError:
                pass
            ray.kill(worker, no_restart=True)


def merge_results(results: list[RewardResult], seconds: float) -> RewardResult:
    """The slices' results as one, in order (see `RayOraclePool` for how metrics combine)."""
    scores = [s for r in results for s in r.scores]
    names = {name for r in results for name in r.components}
    components = {name: [s for r in results for s in r.components.get(name, [None] * len(r.scores))]
                  for name in names}
    metrics: dict[str, float] = {}
    for r in results:
        for key, value in r.metrics.items():
            is_count = "/num_" in key
            metrics[key] = metrics.get(key, 0.0) + value if is_count else max(metrics.get(key, value), value)
    metrics["oracle/latency_s"] = seconds
    return RewardResult(scores, components, metrics)
