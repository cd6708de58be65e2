"""Exact resume: a run killed (SIGKILL, at a random phase of the iteration after its checkpoint, or while a
checkpoint, `final/` or a sync is being written) and resumed logs the same numbers and samples as the run
that was never interrupted; signals checkpoint and exit with the resume command; a changed config is refused;
a run directory is never written by two runs.

The model is the tiny untrained one (the contract is about bitwise equality, not learning), with a large
learning rate so every step moves the weights. The uninterrupted reference and the resumed runs run in this
process; each killed run is one subprocess (tests/resume_runner.py injects the fault).
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from winnow.cli import main
from winnow.logging import read_metrics
from winnow.loops.checkpoint import COMPLETE, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "resume_runner.py"
N = 2  # checkpoint every N iterations; runs are 2N long

REWARD = str(Path(__file__).resolve().parent / "resume_reward.py") + ":digits"
COMMON = ["--device", "cpu", "--oracle.rewards", REWARD, "--num-threads", "1", "--rollout.prompts-per-iteration", "4",
          "--rollout.num-samples", "4", "--rollout.max-tokens", "6", "--learner.lr", "1e-3",
          "--eval.max-prompts", "6", "--eval.every", str(N), "--num-iterations", str(2 * N),
          "--checkpoint.every", str(N), "--logging.no-progress"]
ALGOS = {  # name: (command, its flags)
    "grpo": ("grpo", ["--eval.k", "2"]),
    "ppo": ("ppo", ["--eval.k", "0"]),
    "dpo": ("dpo", ["--pairs.selection", "random"]),  # a selector with state (its rng)
    # SEA's ensemble (members, theta0, Adam, replay buffer, query count) and rngs, mixed labelling from iteration 2
    "sea": ("dpo", ["--pairs.selection", "sea-bai", "--pairs.sea.features", "arithmetic",
                    "--pairs.sea.ensemble.num-members", "4", "--pairs.sea.ensemble.hidden-size", "8",
                    "--pairs.sea.ensemble.batch-size", "2", "--pairs.sea.mixed", "--pairs.sea.mixed-burn-in", "1"]),
    "xpo": ("xpo", ["--rollout.num-samples", "2"]),  # the reference engine's sampling counter
}
PREFERENCE_PHASES = ["generate", "judge", "train", "sync", "eval"]
PHASES = {"grpo": ["generate", "score", "advantages", "train", "sync", "eval"],
          "ppo": ["generate", "score", "advantages", "train", "sync", "eval"],
          "dpo": PREFERENCE_PHASES, "sea": PREFERENCE_PHASES, "xpo": PREFERENCE_PHASES}
VOLATILE = ("time/", "throughput/", "sync/seconds", "sync/mib_per_s")


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The learning-curve plots take most of a tiny run's time; these tests are about resume."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("winnow.recipes.base.plot_run", lambda run_dir: None)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from winnow.data import make_task
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    return save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("resume") / "init")


def flags(algo: str, model: Path, out: Path, name: str, *extra: str) -> list[str]:
    command, extra_flags = ALGOS[algo]
    return ["train", command, "--model.path", str(model), *COMMON, *extra_flags, "--output-dir", str(out),
            "--run-name", name, *extra]


def run_killed(args: list[str], kill: str, *, torchrun: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WINNOW_TEST_KILL": kill, **(env or {})}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, str(RUNNER), *args], env=env, capture_output=True, text=True, timeout=600)


def stable(row: dict) -> dict:
    """A metrics row without wall-clock numbers (latencies, seconds, throughput)."""
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE) and not k.endswith("latency_s")}


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(2 * N + 1)), "steps duplicated, mixed or missing"
    assert [r["step"] for r in want] == list(range(2 * N + 1))
    for g, w in zip(got, want):
        assert stable(g) == stable(w), f"step {g['step']} differs"
    # the iterations after the checkpoint trained: losses, rewards, moving weights
    assert any(w.get("train/grad_norm", 0) > 0 for w in want[N + 1:])
    for sample in sorted((reference / "samples").glob("eval_*.jsonl")):  # the samples' text, bitwise
        assert (resumed / "samples" / sample.name).read_text() == sample.read_text()
    ref_final = torch.load(reference / "checkpoints" / f"iter_{2 * N:05d}" / "policy" / "checkpoint.pt")
    got_final = torch.load(resumed / "checkpoints" / f"iter_{2 * N:05d}" / "policy" / "checkpoint.pt")
    for key, value in ref_final["model"].items():
        assert torch.equal(got_final["model"][key], value), key


@pytest.fixture(scope="module")
def references(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted 2N-iteration run of each algorithm (in this process)."""
    out = tmp_path_factory.mktemp("reference")
    runs = {}
    for algo in ALGOS:
        main(flags(algo, model_dir, out, algo))
        runs[algo] = out / algo
    return runs


@pytest.mark.parametrize("algo", list(ALGOS))
def test_a_run_killed_at_a_random_phase_resumes_bitwise(algo, model_dir, references, tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    iteration, phase = N + rng.randrange(1, N + 1), rng.choice(PHASES[algo])
    if phase == "eval":
        iteration = 2 * N  # evaluations run at N and 2N only
    args = flags(algo, model_dir, tmp_path, "killed")
    proc = run_killed(args, f"{iteration}:{phase}")
    where = f"(killed at iteration {iteration}, phase {phase}; seed {seed})"
    assert proc.returncode == -signal.SIGKILL, f"{where}\n{proc.stderr[-3000:]}"
    run = tmp_path / "killed"
    assert latest_checkpoint(run).name == f"iter_{N:05d}", where
    assert not (run / "final").exists()
    main([*args, "--resume", str(run)])
    assert_same_run(run, references[algo])
    if algo == "sea":  # after the checkpoint the ensemble trained and labelled pairs itself
        last = read_metrics(references["sea"])[2 * N]
        assert "sea/rm_loss" in last and last["counts/model_labelled_pairs"] > 0


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(model_dir, references, tmp_path):
    args = flags("grpo", model_dir, tmp_path, "run")
    proc = run_killed(args, f"{2 * N}:checkpoint")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "run"
    # the half-written checkpoint is only a temporary directory; the previous one is whole
    assert (run / "checkpoints" / f".tmp-iter_{2 * N:05d}").is_dir()
    assert latest_checkpoint(run).name == f"iter_{N:05d}"
    main([*args, "--resume", str(run)])
    assert not (run / "checkpoints" / f".tmp-iter_{2 * N:05d}").exists()
    assert_same_run(run, references["grpo"])


def test_killed_in_the_middle_of_a_weight_sync_resumes_bitwise(model_dir, tmp_path):
    """The engine had taken one bucket of iteration N+1's weights when the process died; the resumed run
    syncs the checkpoint's weights before its first generate and replays the uninterrupted run."""
    buckets = ["--sync.bucket-mb", "0.25"]  # the tiny model's 1.9 MiB in 8 buckets
    main(flags("grpo", model_dir, tmp_path, "full", *buckets))
    args = flags("grpo", model_dir, tmp_path, "run", *buckets)
    proc = run_killed(args, f"{N + 1}:mid-sync")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "full")[N + 1]["sync/num_buckets"] > 1
    main([*args, "--resume", str(tmp_path / "run")])
    assert_same_run(tmp_path / "run", tmp_path / "full")


def test_killed_while_writing_final_leaves_no_half_model(model_dir, references, tmp_path):
    from transformers import AutoModelForCausalLM

    args = flags("grpo", model_dir, tmp_path, "run")
    proc = run_killed(args, "0:final")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "final").exists() and (run / ".tmp-final").is_dir()
    assert latest_checkpoint(run).name == f"iter_{2 * N:05d}"
    main([*args, "--resume", str(run)])  # nothing left to train: writes final/
    assert not (run / ".tmp-final").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    want = AutoModelForCausalLM.from_pretrained(references["grpo"] / "final")
    for (name, a), (_, b) in zip(model.named_parameters(), want.named_parameters()):
        assert torch.equal(a, b), name
    assert_same_run(run, references["grpo"])


def test_sigterm_checkpoints_and_prints_the_resume_command_sigint_twice_stops_at_once(model_dir, references,
                                                                                       tmp_path):
    marker = tmp_path / "in-train"
    args = flags("grpo", model_dir, tmp_path, "run")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WINNOW_TEST_PAUSE": f"1:train:3:{marker}"}
    proc = subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)  # during iteration 1's train phase: it finishes, checkpoints, exits
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "iter_00001"  # off the every-N schedule: written for the signal
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    command = stderr.split("resume with: ")[1].splitlines()[0]
    assert command.startswith("winnow train grpo ") and command.endswith(f"--resume {run}")
    # the printed command, run as printed, continues to the same numbers as the uninterrupted run
    main(shlex.split(command)[1:])
    assert_same_run(run, references["grpo"])

    marker2 = tmp_path / "in-train-2"
    env["WINNOW_TEST_PAUSE"] = f"1:train:30:{marker2}"
    proc = subprocess.Popen([sys.executable, str(RUNNER), *flags("grpo", model_dir, tmp_path, "twice")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker2, proc)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 20, "a second SIGINT must stop at once (the pause was 30 s)"
    assert proc.returncode != 0 and "second SIGINT" in stderr, stderr[-3000:]
    assert latest_checkpoint(tmp_path / "twice") is None


def _wait_for(marker: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def refused(capsys, argv: list[str]) -> str:
    """The one-line error `winnow` prints for a user error (exit status 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_changed_config_is_refused_unless_forced(model_dir, references, tmp_path, capsys):
    run = references["grpo"]
    message = refused(capsys, flags("grpo", model_dir, tmp_path, "x", "--learner.lr", "2e-3",
                                    "--rollout.num-samples", "2", "--resume", str(run)))
    assert "learner.lr: 0.001 -> 0.002" in message and "rollout.num_samples: 4 -> 2" in message
    assert "--resume-force" in message
    # settings that do not change the maths may change (logging, eval, threads)
    forced = tmp_path / "forced"
    import shutil

    shutil.copytree(run, forced)
    main(flags("grpo", model_dir, tmp_path, "x", "--eval.k", "0", "--num-threads", "2", "--resume", str(forced)))
    # forced: the run continues (nothing left to train here) and its config records the change
    main(flags("grpo", model_dir, tmp_path, "x", "--learner.lr", "2e-3", "--resume", str(forced),
               "--resume-force"))
    assert "lr: 0.002" in (forced / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(forced)] == list(range(2 * N + 1))


def test_a_second_run_into_a_run_directory_is_refused(model_dir, references, tmp_path, capsys):
    import shutil

    shutil.copytree(references["grpo"], tmp_path / "grpo")
    assert re.search("--overwrite.*--resume", refused(capsys, flags("grpo", model_dir, tmp_path, "grpo")))
    assert read_metrics(tmp_path / "grpo") == read_metrics(references["grpo"])  # untouched
    assert "no complete checkpoint" in refused(capsys, flags("grpo", model_dir, tmp_path, "y", "--resume",
                                                             str(tmp_path / "nothing-here")))
    main(flags("grpo", model_dir, tmp_path, "grpo", "--overwrite", "--num-iterations", "1",
               "--checkpoint.every", "0"))
    assert [r["step"] for r in read_metrics(tmp_path / "grpo")] == [0, 1]  # one run, not two mixed
    # --resume auto: a fresh run when OUTPUT_DIR/RUN_NAME has no checkpoint, a resumed one when it has
    main(flags("grpo", model_dir, tmp_path, "auto", "--resume", "auto", "--num-iterations", "1",
               "--checkpoint.every", "1"))
    main(flags("grpo", model_dir, tmp_path, "auto", "--resume", "auto", "--num-iterations", "1",
               "--checkpoint.every", "1"))
    assert [r["step"] for r in read_metrics(tmp_path / "auto")] == [0, 1]


def test_quickstart_refuses_a_used_output_dir(tmp_path):
    from winnow.quickstart import QuickstartConfig, check_output_dir

    config = QuickstartConfig(output_dir=str(tmp_path))
    check_output_dir(config)  # empty: fine
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="--overwrite.*--output-dir"):
        check_output_dir(config)
    check_output_dir(QuickstartConfig(output_dir=str(tmp_path), overwrite=True))


def cut_back(full: Path, last_iteration: int) -> Path:
    """A copy of the finished run `full` as it stood before its last checkpoint: that checkpoint and `final/`
    removed, so a resume redoes the iterations after the one before it."""
    import shutil

    cut = full.parent / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / f"iter_{last_iteration:05d}")
    shutil.rmtree(cut / "final")
    return cut


def test_sft_resumes_exactly(model_dir, tmp_path):
    args = ["sft", "--model.path", str(model_dir), "--device", "cpu", "--num-threads", "1", "--batch-size", "8",
            "--num-steps", "4", "--checkpoint.every", "2", "--learner.lr", "1e-3", "--eval.max-prompts", "4",
            "--eval.every", "2", "--max-tokens", "6", "--logging.no-progress", "--output-dir", str(tmp_path)]
    main([*args, "--run-name", "full"])
    cut_back(tmp_path / "full", 4)
    main([*args, "--run-name", "cut", "--resume", str(tmp_path / "cut")])
    got, want = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert [stable(r) for r in got] == [stable(r) for r in want]


def test_lora_grpo_with_a_kl_to_its_reference_resumes_exactly(model_dir, tmp_path):
    """LoRA: the checkpoint holds the adapters (and the frozen base), the reference is the adapters off."""
    args = flags("grpo", model_dir, tmp_path, "full", "--lora-rank", "4", "--algo.kl-coef", "0.1")
    main(args)
    cut_back(tmp_path / "full", 2 * N)
    main([*flags("grpo", model_dir, tmp_path, "cut", "--lora-rank", "4", "--algo.kl-coef", "0.1"),
          "--resume", str(tmp_path / "cut")])
    assert_same_run(tmp_path / "cut", tmp_path / "full")
    assert read_metrics(tmp_path / "full")[2 * N]["train/kl"] != 0


def test_offline_dpo_resumes_exactly(model_dir, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(10, 20) for b in range(10, 13)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "dpo", "--offline", "--model.path", str(model_dir), "--data.train", str(data), "--device", "cpu",
            "--num-threads", "1", "--rollout.prompts-per-iteration", "8", "--num-iterations", "4",
            "--checkpoint.every", "2", "--learner.lr", "1e-3", "--learner.micro-batch-size", "16",
            "--eval.every", "2", "--logging.no-progress", "--output-dir", str(tmp_path)]
    main([*args, "--run-name", "full"])
    cut_back(tmp_path / "full", 4)
    main([*args, "--run-name", "cut", "--resume", str(tmp_path / "cut")])
    got, want = read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert [stable(r) for r in got] == [stable(r) for r in want]
    assert want[4]["counts/pairs"] == 32 and want[3]["train/loss"] != want[4]["train/loss"]


def test_a_full_disk_is_reported_before_the_checkpoint_is_lost(tiny_model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from winnow.learner.learner import Learner, LearnerConfig
    from winnow.loops.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
    from winnow.loops.rl import RolloutCounters

    class Family:
        counters = RolloutCounters()

        def state_dict(self):
            return {"counters": {}}

    learner = Learner(tiny_model, LearnerConfig(lr=1e-3), 10)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(every=1, keep=2), {"policy": learner})
    first = checkpointer.save(1, Family())
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, size // 2))
    with pytest.raises(CheckpointError, match="MiB free.*needs about.*last good checkpoint"):
        checkpointer.save(2, Family())
    monkeypatch.undo()
    # an I/O error in the middle of the write (ENOSPC) removes the partial copy; the previous one is whole
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if "state_rank" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left.*last good checkpoint is intact"):
        checkpointer.save(2, Family())
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_00001"]
    assert (first / COMPLETE).is_file() and latest_checkpoint(tmp_path) == first


@pytest.mark.slow
def test_fsdp2_on_two_processes_killed_and_resumed_is_bitwise(model_dir, tmp_path):
    """The sharded strategy's own checkpoint format (torch.distributed.checkpoint shards, one RNG file per
    rank), under torchrun with 2 gloo processes: killed in iteration N+1's train phase, resumed, bitwise."""
    sharded = ["--learner.strategy", "fsdp2", "--learner.micro-batch-size", "4"]
    reference = run_killed(flags("grpo", model_dir, tmp_path, "full", *sharded), "0:none", torchrun=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = flags("grpo", model_dir, tmp_path, "killed", *sharded)
    killed = run_killed(args, f"{N + 1}:train", torchrun=2)
    assert killed.returncode != 0
    run = tmp_path / "killed"
    assert latest_checkpoint(run).name == f"iter_{N:05d}"
    assert sorted(p.name for p in latest_checkpoint(run).glob("state_rank*.pt")) == ["state_rank0.pt",
                                                                                    "state_rank1.pt"]
    resumed = run_killed([*args, "--resume", str(run)], "0:none", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = read_metrics(run), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == list(range(2 * N + 1))
    assert [stable(r) for r in got] == [stable(r) for r in want]
    assert all(w["train/grad_norm"] > 0 for w in want[1:])
    for sample in sorted((tmp_path / "full" / "samples").glob("eval_*.jsonl")):
        assert (run / "samples" / sample.name).read_text() == sample.read_text()


@pytest.mark.slow
def test_deepspeed_on_two_processes_resumed_from_its_checkpoint_is_bitwise(model_dir, tmp_path):
    """DeepSpeed ZeRO-2's own checkpoint format (its engine's model file and one optimizer partition per rank,
    the scheduler inside; one RNG file per rank), under torchrun with 2 gloo processes. The 2N-iteration run's
    directory, cut back to its iteration-N checkpoint (what a kill after that checkpoint leaves; the kill itself is
    covered above for every strategy's loop), resumes to the same numbers, samples and weights, bitwise."""
    pytest.importorskip("deepspeed")
    args = flags("grpo", model_dir, tmp_path, "full", "--learner.strategy", "deepspeed",
                 "--learner.sharding.zero-stage", "2", "--learner.micro-batch-size", "4")
    full = run_killed(args, "0:none", torchrun=2)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = cut_back(tmp_path / "full", 2 * N)
    assert sorted(p.name for p in (latest_checkpoint(cut) / "policy").rglob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = run_killed([*args, "--resume", str(cut)], "0:none", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = read_metrics(cut), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == list(range(2 * N + 1))
    assert [stable(r) for r in got] == [stable(r) for r in want]
    assert all(w["train/grad_norm"] > 0 for w in want[N + 1:])
    for sample in sorted((tmp_path / "full" / "samples").glob("eval_*.jsonl")):
        assert (cut / "samples" / sample.name).read_text() == sample.read_text()
    for name in ("model.safetensors", "config.json"):
        assert (cut / "final" / name).read_bytes() == (tmp_path / "full" / "final" / name).read_bytes(), name
