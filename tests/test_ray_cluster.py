"""`--runtime ray` across two Ray nodes on one machine (`ray.cluster_utils.Cluster`: two raylets, each with its
own CPUs, as `ray start --head` and `ray start --address` make them): with STRICT_SPREAD the two learner ranks
(each with its colocated engine) land on different nodes, form their torch.distributed world across them, split
generation between them, and sync and check their weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from winnow.distributed.config import RayConfig  # noqa: E402
from winnow.distributed.runtime import connect  # noqa: E402
from winnow.learner.sync import SyncConfig  # noqa: E402
from winnow.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_split_generation_and_sync_across_them(two_nodes, tmp_path):
    from tests.test_ray_runtime import config, local_samples  # the same tiny run and local reference

    from winnow.distributed.groups import RayActorGroup, RayLearnerGroup
    from winnow.distributed.runtime import RayRuntime
    from winnow.learner.learner import LearnerConfig
    from winnow.recipes.on_ray import skeleton, worker_spec

    model_dir = _tiny_model(tmp_path)
    ray_config = RayConfig(address=two_nodes.address, placement="colocated", num_learner_ranks=2,
                           placement_strategy="STRICT_SPREAD")
    assert connect(ray_config) is False  # joined the running cluster, did not start one
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    run = config(model_dir, tmp_path, "nodes", runtime="ray", ray=ray_config,
                 learner=LearnerConfig(lr=2e-3, micro_batch_size=64, strategy="fsdp2"))
    runtime = RayRuntime.start(run.ray, worker_spec(run, run.algo))
    try:
        nodes = ray.get([rank.node_id.remote() for rank in runtime.ranks])
        assert len(set(nodes)) == 2, nodes  # one rank per node
        actor = RayActorGroup(runtime)
        learner = RayLearnerGroup(runtime, skeleton(run), run.learner, 1.0)
        prompts = [[3 + i % 7, 4 + i % 5, 5] for i in range(6)]
        params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=3)
        want = [c.response_ids for c in local_samples(model_dir, prompts, params)]
        assert [c.response_ids for c in actor.generate(prompts, params)] == want
        metrics = actor.sync(learner, SyncConfig(check_sync=True), prompts, seed=0)
        assert metrics["sync/logprob_diff_max"] < 1e-5 and metrics["sync/bytes"] > 1e6
    finally:
        runtime.shutdown()


def _tiny_model(tmp_path: Path) -> Path:
    from winnow.data import make_task
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    return save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "init")
