"""`--runtime ray` on CPU with a local Ray (started once for the module; gloo between the learner ranks and for
the weight broadcast): the Ray runtime gives the local runtime's rewards and losses iteration by iteration in
both placements, learns, resumes from its checkpoints; generation split over replicas draws the local engine's
samples; a replica killed mid-generation is restarted, re-synced and its shard regenerated; a learner rank that
dies stops the run naming the rank and the checkpoint.

The model is the tiny untrained one with a dense reward (the fraction of digits in the response), so every
iteration trains and the reward rises within a few iterations at a large learning rate.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from winnow.algorithms import OBJECTIVES  # noqa: E402
from winnow.cli import main  # noqa: E402
from winnow.data import DataConfig  # noqa: E402
from winnow.distributed.config import RayConfig  # noqa: E402
from winnow.learner.learner import LearnerConfig  # noqa: E402
from winnow.learner.sync import SyncConfig  # noqa: E402
from winnow.logging import LoggingConfig, read_metrics  # noqa: E402
from winnow.loops.checkpoint import CheckpointConfig  # noqa: E402
from winnow.loops.config import EvalConfig, RolloutConfig  # noqa: E402
from winnow.oracles import OracleConfig, RuleOracleConfig  # noqa: E402
from winnow.recipes.rl import TrainConfig, train  # noqa: E402
from winnow.setup import ModelConfig, load_policy  # noqa: E402

pytestmark = pytest.mark.slow
REWARD = str(Path(__file__).resolve().parent / "resume_reward.py") + ":digits"
NUM_ITERATIONS = 6


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray for the module: 8 logical CPUs (the workers mostly wait on each other), no dashboard."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with pytest.MonkeyPatch.context() as patch:  # the curves' plots cost more than these tiny runs
        patch.setattr("winnow.recipes.base.plot_run", lambda run_dir: None)
        yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from winnow.data import make_task
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    return save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("ray") / "init")


def config(model_dir: Path, out: Path, name: str, **overrides) -> TrainConfig:
    fields = dict(
        algo=OBJECTIVES["grpo"](), model=ModelConfig(path=str(model_dir)), data=DataConfig(train="arithmetic"),
        oracle=OracleConfig(rule=RuleOracleConfig(rewards=[REWARD])), logging=LoggingConfig(progress=False),
        num_iterations=NUM_ITERATIONS, run_name=name, output_dir=str(out), device="cpu", num_threads=1,
        rollout=RolloutConfig(prompts_per_iteration=8, num_samples=4, max_tokens=6),
        learner=LearnerConfig(lr=2e-3, micro_batch_size=64), eval=EvalConfig(every=0, k=0, max_prompts=8),
        save_final=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def on_ray(placement: str, **ray_fields) -> dict:
    return dict(runtime="ray", learner=LearnerConfig(lr=2e-3, micro_batch_size=64, strategy="fsdp2"),
                ray=RayConfig(placement=placement, num_replicas=2, num_learner_ranks=2, **ray_fields))


@pytest.fixture(scope="module")
def local_run(model_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local")
    return read_metrics(train(config(model_dir, out, "local")))


def assert_same_iterations(got: list[dict], want: list[dict]) -> None:
    """Rewards equal (the same samples), losses and gradient norms to float tolerance, every iteration."""
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(NUM_ITERATIONS + 1))
    for g, w in zip(got[1:], want[1:]):
        assert g["reward/mean"] == w["reward/mean"], g["step"]
        assert g["rollout/generated_tokens"] == w["rollout/generated_tokens"], g["step"]
        for key in ("train/loss", "train/grad_norm"):
            assert math.isclose(g[key], w[key], rel_tol=1e-4, abs_tol=1e-6), (g["step"], key, g[key], w[key])


def test_colocated_gives_the_local_runtimes_numbers_learns_and_resumes(model_dir, local_run, tmp_path):
    every = NUM_ITERATIONS // 2
    run = dict(sync=SyncConfig(check_sync=True), checkpoint=CheckpointConfig(every=every), **on_ray("colocated"))
    run_dir = train(config(model_dir, tmp_path, "colocated", **run))
    rows = read_metrics(run_dir)
    assert_same_iterations(rows, local_run)
    # the sync was checked on both replicas, and the reward rose: the run learned through Ray
    assert all(r["sync/logprob_diff_mean"] < 1e-4 for r in rows[1:])
    first, last = rows[1]["reward/mean"], sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)  # measured: 0.80 -> 0.95
    assert rows[-1]["eval/greedy_accuracy"] > rows[0]["eval/greedy_accuracy"]  # held out: 0 -> 1
    # FSDP2's sharded checkpoint, written by the two ranks, and each rank's generators
    checkpoint = run_dir / "checkpoints" / f"iter_{every:05d}" / "policy"
    assert {"rng_rank0.pt", "rng_rank1.pt", "trainer_state.pt"} <= {p.name for p in checkpoint.iterdir()}
    # resume from the middle checkpoint: the iterations after it are the uninterrupted run's
    shutil.rmtree(run_dir / "checkpoints" / f"iter_{NUM_ITERATIONS:05d}")
    resumed = read_metrics(train(config(model_dir, tmp_path, "colocated", resume=str(run_dir), **run)))
    assert [r["step"] for r in resumed] == list(range(NUM_ITERATIONS + 1))
    for g, w in zip(resumed[every + 1:], rows[every + 1:]):
        assert g["reward/mean"] == w["reward/mean"] and math.isclose(g["train/loss"], w["train/loss"],
                                                                     rel_tol=1e-5, abs_tol=1e-7), g["step"]
    # what a run whose learner rank died says: this checkpoint, and the command that resumes from it
    from winnow.recipes.on_ray import resume_advice

    advice = resume_advice(run_dir)
    assert f"iter_{NUM_ITERATIONS:05d}" in advice and f"--resume {run_dir}" in advice, advice


def test_split_gives_the_local_runtimes_numbers(model_dir, local_run, tmp_path):
    """Two replicas fed by one learner rank's broadcast; the rewards scored by two oracle workers."""
    run = config(model_dir, tmp_path, "split", runtime="ray", save_final=True,
                 ray=RayConfig(placement="split", num_replicas=2, num_learner_ranks=1, num_oracle_workers=2))
    run_dir = train(run)
    rows = read_metrics(run_dir)
    assert_same_iterations(rows, local_run)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run_dir / "final").iterdir()}
    assert all(r["sync/num_buckets"] == 1 and r["sync/bytes"] > 1e6 for r in rows[1:])


@pytest.fixture(scope="module")
def split_runtime(model_dir, tmp_path_factory):
    """A split runtime driven directly: 2 replicas, 2 FSDP2 learner ranks."""
    from winnow.distributed.groups import RayActorGroup, RayLearnerGroup
    from winnow.distributed.runtime import RayRuntime
    from winnow.recipes.on_ray import skeleton, worker_spec

    run = config(model_dir, tmp_path_factory.mktemp("direct"), "direct", **on_ray("split"))
    runtime = RayRuntime.start(run.ray, worker_spec(run, run.algo))
    yield runtime, RayActorGroup(runtime), RayLearnerGroup(runtime, skeleton(run), run.learner, 1.0), run
    runtime.shutdown()


def local_samples(model_dir: Path, prompts, params):
    from winnow.engines.hf import HFEngine

    model, tokenizer = load_policy(ModelConfig(path=str(model_dir)))
    return HFEngine(model, tokenizer, device="cpu").generate(prompts, params)


def test_split_generation_draws_the_local_engines_samples_and_survives_a_killed_replica(model_dir, split_runtime):
    import torch

    from winnow.learner.batch import make_train_batch
    from winnow.types import SamplingParams

    runtime, actor, learner, run = split_runtime
    prompts = [[3 + i % 7, 4 + i % 5, 5] for i in range(16)]
    params = SamplingParams(temperature=1.0, max_tokens=32, n=4, seed=7, ignore_eos=True)
    want = [c.response_ids for c in local_samples(model_dir, prompts, params)]
    assert [c.response_ids for c in actor.generate(prompts, params)] == want

    # one optimizer step, so the replicas' initial weights are stale, then the broadcast and its check
    completions = actor.generate(prompts[:8], params)
    batch = make_train_batch(completions, torch.linspace(-1, 1, len(completions)))
    learner.train_policy(batch, partial(run.algo.loss, max_tokens=params.max_tokens))
    assert learner.num_steps == 1
    metrics = actor.sync(learner, SyncConfig(check_sync=True), prompts[:2], seed=0)
    assert metrics["sync/logprob_diff_mean"] < 1e-5
    start = time.perf_counter()
    want = [c.response_ids for c in actor.generate(prompts * 8, params)]  # the trained policy's samples
    seconds = time.perf_counter() - start
    killed = runtime.replicas[1]
    result = {}
    worker = threading.Thread(target=lambda: result.update(got=actor.generate(prompts * 8, params)))
    worker.start()
    time.sleep(seconds / 3)  # the replicas are decoding their 64 prompts x 4 samples x 32 tokens each
    ray.kill(killed, no_restart=True)
    worker.join(timeout=300)
    assert actor.num_restarts == 1 and runtime.replicas[1] is not killed
    got = [c.response_ids for c in result["got"]]
    # nothing lost, nothing drawn twice, in prompt order; and the restarted replica's shard came from the trained
    # weights (a replica left on its initial weights would draw other tokens): it was re-synced
    assert got == want
    assert actor.sync(learner, SyncConfig(check_sync=True), prompts[:2], seed=0)["sync/logprob_diff_max"] < 1e-4


def test_a_dead_learner_rank_stops_the_run_naming_the_rank(split_runtime):
    from winnow.distributed.groups import LearnerRankDiedError

    import torch

    from winnow.learner.batch import make_train_batch
    from winnow.types import SamplingParams

    runtime, actor, learner, run = split_runtime
    completions = actor.generate([[3, 4, 5], [4, 5, 6]], SamplingParams(max_tokens=4, n=2, seed=1))
    batch = make_train_batch(completions, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    ray.kill(runtime.ranks[1], no_restart=True)
    # rank 0 enters the step's first collective and waits there for ever; the dead rank is named at once
    with pytest.raises(LearnerRankDiedError, match="learner rank 1 died"):
        learner.train_policy(batch, partial(run.algo.loss, max_tokens=4))


def test_the_broadcast_sends_weights_in_the_engines_dtype():
    """Split placement's broadcast (gloo, two members in two threads): with the engines' dtype given, floating
    tensors travel cast to it (half the bytes for bf16 engines), integer ones as they are, in bucket order."""
    import torch

    from winnow.distributed.broadcast import BroadcastGroup, free_address

    host, port = free_address()
    weights = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3), ("b", torch.tensor([7, 8])),
               ("c", torch.full((4,), 1 / 7))]
    members, received = [None, None], []

    def join(rank):
        members[rank] = BroadcastGroup(host, port, rank, 2, "gloo", torch.device("cpu"))

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    receiver = threading.Thread(target=lambda: received.extend(b for bucket, _ in members[1].receive() for b in bucket))
    receiver.start()
    metrics = members[0].send(iter(weights), bucket_bytes=16, dtype=torch.bfloat16)
    receiver.join()
    assert [name for name, _ in received] == ["a", "b", "c"]
    assert [t.dtype for _, t in received] == [torch.bfloat16, torch.int64, torch.bfloat16]
    for (_, sent), (_, got) in zip(weights, received):
        expected = sent.to(torch.bfloat16) if sent.is_floating_point() else sent
        assert torch.equal(got, expected)
    assert metrics["sync/bytes"] == 6 * 2 + 2 * 8 + 4 * 2 and metrics["sync/num_buckets"] == 3
    [m.close() for m in members]


def test_oracle_slices_merge_in_order_counts_summed_latencies_the_slowest():
    from winnow.distributed.oracle_pool import merge_results
    from winnow.types import RewardResult

    a = RewardResult([1.0, None], {"exact": [1.0, None]}, {"oracle/num_failed": 1.0, "oracle/exact/latency_s": 0.2})
    b = RewardResult([0.5], {"exact": [0.5]}, {"oracle/num_failed": 0.0, "oracle/exact/latency_s": 0.3})
    merged = merge_results([a, b], seconds=0.4)
    assert merged.scores == [1.0, None, 0.5] and merged.components == {"exact": [1.0, None, 0.5]}
    assert merged.metrics == {"oracle/num_failed": 1.0, "oracle/exact/latency_s": 0.3, "oracle/latency_s": 0.4}


def test_start_up_refusals_name_the_flag(model_dir, tmp_path, capsys):
    base = ["train", "grpo", "--model.path", str(model_dir), "--output-dir", str(tmp_path), "--runtime", "ray"]
    with pytest.raises(SystemExit) as stop:
        main(base + ["--ray.num-learner-ranks", "2"])
    assert stop.value.code == 2 and "--learner.strategy fsdp2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train", "ppo", "--model.path", str(model_dir), "--output-dir", str(tmp_path), "--runtime", "ray",
              "--ray.num-learner-ranks", "2", "--learner.strategy", "fsdp2"])
    assert stop.value.code == 2 and "--ray.num-learner-ranks 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train", "dpo", "--model.path", str(model_dir), "--output-dir", str(tmp_path), "--runtime", "ray",
              "--ray.num-learner-ranks", "1", "--pairs.selection", "apl"])
    assert stop.value.code == 2 and "--pairs.selection apl needs the policy" in capsys.readouterr().err


def test_ppo_on_ray_gives_the_local_runtimes_numbers(model_dir, tmp_path):
    """PPO on Ray (split: 2 replicas generate, 1 learner rank trains the policy and, after each policy step, its
    critic beside it): the local run's rewards, policy and critic losses, iteration by iteration; the critic is
    saved with the run."""
    ppo = dict(algo=OBJECTIVES["ppo"](), num_iterations=3, save_final=True,
               rollout=RolloutConfig(prompts_per_iteration=8, num_samples=2, max_tokens=6))
    local = read_metrics(train(config(model_dir, tmp_path, "ppo-local", **ppo)))
    on_ray = dict(runtime="ray", sync=SyncConfig(check_sync=True), checkpoint=CheckpointConfig(every=2),
                  ray=RayConfig(placement="split", num_replicas=2, num_learner_ranks=1), **ppo)
    run_dir = train(config(model_dir, tmp_path, "ppo-ray", **on_ray))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in local] == [0, 1, 2, 3]
    for got, want in zip(rows[1:], local[1:]):
        assert got["reward/mean"] == want["reward/mean"], got["step"]
        for key in ("train/loss", "train/critic/value_loss"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-6), (got["step"], key)
        assert got["sync/logprob_diff_mean"] < 1e-4
    assert local[-1]["train/critic/value_loss"] != local[1]["train/critic/value_loss"]  # the critic trained
    assert (run_dir / "critic").is_dir() and (run_dir / "final").is_dir()
    # resumed from iteration 2's checkpoint (the critic's included), iteration 3 is the uninterrupted run's
    shutil.rmtree(run_dir / "checkpoints" / "iter_00003", ignore_errors=True)
    resumed = read_metrics(train(config(model_dir, tmp_path, "ppo-ray", resume=str(run_dir), **on_ray)))
    assert resumed[3]["reward/mean"] == rows[3]["reward/mean"]
    assert math.isclose(resumed[3]["train/critic/value_loss"], rows[3]["train/critic/value_loss"], rel_tol=1e-5)


def test_online_dpo_on_ray_gives_the_local_runtimes_numbers(model_dir, tmp_path):
    """The preference loop on Ray (split: 2 replicas sample the candidates, the driver picks and labels the
    pairs, 1 learner rank trains): the local run's pairs (the same samples, so the same rewards and margins)
    and losses, iteration by iteration."""
    from winnow.algorithms.preference import DPO
    from winnow.loops.config import PairConfig, WinRateConfig
    from winnow.recipes.preference import PreferenceTrainConfig, train_preference

    def dpo(name: str, **overrides) -> list[dict]:
        return read_metrics(train_preference(PreferenceTrainConfig(
            algo=DPO(), model=ModelConfig(path=str(model_dir)), device="cpu", seed=0, num_threads=1,
            rollout=RolloutConfig(prompts_per_iteration=8, num_samples=4, max_tokens=4),
            pairs=PairConfig(selection="best_vs_worst"), learner=LearnerConfig(lr=1e-3, micro_batch_size=16),
            oracle=OracleConfig(rule=RuleOracleConfig(rewards=[REWARD])), eval=WinRateConfig(every=0, max_prompts=8),
            num_iterations=3, logging=LoggingConfig(progress=False), output_dir=str(tmp_path), run_name=name,
            save_final=False, **overrides)))

    local = dpo("local")
    on_ray_rows = dpo("ray", runtime="ray", sync=SyncConfig(check_sync=True),
                      ray=RayConfig(placement="split", num_replicas=2, num_learner_ranks=1))
    assert [r["step"] for r in on_ray_rows] == [r["step"] for r in local] == [0, 1, 2, 3]
    for got, want in zip(on_ray_rows[1:], local[1:]):
        assert got["counts/oracle_queries"] == want["counts/oracle_queries"] > 0
        assert math.isclose(got["train/loss"], want["train/loss"], rel_tol=1e-5, abs_tol=1e-7), got["step"]
        assert got["sync/logprob_diff_mean"] < 1e-4
    assert local[-1]["train/loss"] != local[1]["train/loss"]  # it trained: the loss moved
