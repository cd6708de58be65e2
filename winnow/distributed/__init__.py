"""`--runtime ray`: the loop's Actor, Learner and Oracle as Ray actors, for many GPUs and many nodes.

    config.py       RayConfig (`--ray.*`): placement, counts, resources per worker
    runtime.py      join/start Ray, the placement group, the workers
    worker.py       one Ray actor: an engine replica, a learner rank, or both (colocated)
    groups.py       the loop's seam over the workers: RayActorGroup (generation split across replicas, weight
                    sync, restarts) and RayLearnerGroup (the batch to every rank)
    broadcast.py    the split placement's bucketed weight broadcast over its own process group
    oracle_pool.py  reward functions in a pool of CPU Ray actors

Ray is imported only where a run uses it (`pip install "winnow[ray]"`).
"""
