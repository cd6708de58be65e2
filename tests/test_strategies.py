"""Sharded learners against the single-process one, checkpoint resume, and bucketed, verified weight sync.

The distributed tests launch `torchrun --nproc-per-node 2` (gloo, CPU) on tests/dist_train.py, which
trains the tiny model 4 steps on a fixed 10-sequence batch, each rank on its shard. The losses must equal
the single process's on the whole batch: the normalisers are all-reduced and the backward is scaled by
world_size (winnow/learner/strategy.py), so only float summation order differs (measured: ~1e-7 relative).
On CPU, DeepSpeed JIT-compiles its shared-memory all-reduce op on first use (~40 s once, then cached in
~/.cache/torch_extensions); the whole file takes ~4 minutes on 2 cores.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_train import fixed_batch, make_loss_fn, train
from winnow.engines.hf import HFEngine
from winnow.learner.learner import Learner, LearnerConfig, _token_budget_sizes
from winnow.learner.strategy import make_strategy
from winnow.learner.sync import SyncError, iter_buckets, sync_weights, verify_sync

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5
SHARDED = {
    "fsdp2": ["--strategy", "fsdp2"],
    "zero2": ["--strategy", "deepspeed", "--zero-stage", "2"],
    "zero3": ["--strategy", "deepspeed", "--zero-stage", "3"],
    "zero3-offload": ["--strategy", "deepspeed", "--zero-stage", "3", "--offload"],
}


def torchrun(args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "dist_train.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _position_sum(tensor: torch.Tensor) -> float:
    """dist_train's checksum: sum of x_i cos(i), which moves when elements trade places."""
    flat = tensor.detach().double().flatten()
    return float((flat * torch.arange(flat.numel(), dtype=torch.float64).cos()).sum())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, the whole batch, the same 4 steps; checkpoint after step 2."""
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    return train("single", save_at=2, ckpt=str(ckpt)), ckpt


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=REL_TOL), (got, want)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=REL_TOL)
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHARDED))
def test_two_ranks_match_one_process_and_resume(name, single_run, tmp_path):
    if name != "fsdp2":
        pytest.importorskip("deepspeed")
    reference = single_run[0]
    # The losses fall (the test would be empty if the weights did not move) and are the single process's.
    assert reference["steps"][-1]["loss"] < reference["steps"][0]["loss"] - 0.5
    ckpt = tmp_path / "ckpt"
    final = tmp_path / "final"
    full = torchrun([*SHARDED[name], "--save-at", "2", "--ckpt", str(ckpt), "--save-pretrained", str(final)],
                    tmp_path / "full.json")
    assert full["world_size"] == 2
    assert_same_losses(full["steps"], reference["steps"])
    # The gathered full weights (what the engine receives) are the single process's weights.
    assert full["weight_sums"].keys() == reference["weight_sums"].keys()
    for key, value in reference["weight_sums"].items():
        assert full["weight_sums"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    # Gathered for a bf16 engine: FSDP2 all-gathers bf16 shards (half the bytes) in buckets, the same bf16 weights
    # in the same places (the checksums weigh each element by its position).
    assert full["gathered_dtypes"] == (["torch.bfloat16"] if name == "fsdp2" else ["torch.float32"])
    for key, value in reference["bf16_sums"].items():
        assert full["bf16_sums"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
    # ... and so is the model rank 0 saved with save_pretrained.
    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    for key, param in saved.named_parameters():
        want = reference["weight_sums"][key]
        assert _position_sum(param) == pytest.approx(want, rel=1e-4, abs=1e-4), key
    if name == "zero3-offload":
        return  # resume is covered by zero3; offload changes where the state lives, not what is saved
    # A fresh pair of processes loads the step-2 checkpoint: steps 3 and 4 are the uninterrupted run's.
    resumed = torchrun([*SHARDED[name], "--load", str(ckpt), "--steps", "2"], tmp_path / "resumed.json")
    assert_same_losses(resumed["steps"], full["steps"][2:])


@pytest.mark.slow
def test_token_budget_micro_batches_on_two_ranks_match_one_process(single_run, tmp_path):
    """--learner.micro-batch-tokens 10 gives rank 0 (lengths 3, 7, 4, 5, 5) micro-batches [7] [5 5] [4 3] and
    rank 1 (5, 6, 6, 7, 4) [7] [6] [6] [5 4]: rank 0 splits one more so both run four backwards (FSDP's are
    collectives), and the losses are still the single process's with micro-batches of 2."""
    shards = [fixed_batch().attention_mask.sum(dim=1)[rank::2].sort(descending=True).values.tolist() for rank in (0, 1)]
    assert shards == [[7, 5, 5, 4, 3], [7, 6, 6, 5, 4]]
    assert [_token_budget_sizes(lengths, 1, 10) for lengths in shards] == [[1, 2, 2], [1, 1, 1, 2]]
    run = torchrun(["--strategy", "fsdp2", "--micro-batch-tokens", "10"], tmp_path / "tokens.json")
    assert_same_losses(run["steps"], single_run[0]["steps"])


@pytest.mark.slow
def test_shared_prompts_on_two_ranks_match_one_process(single_run, tmp_path):
    """FSDP2 ranks with --learner.share-prompts (each rank's rows of one prompt run it once, packed; the model's own
    forward with logits only where labels are) train to the single process's losses over separate rows."""
    rank_groups = [fixed_batch().group_index[rank::2].tolist() for rank in (0, 1)]
    assert rank_groups == [[0, 2, 1, 0, 2], [1, 0, 2, 1, 0]]  # each rank holds two groups of two rows
    run = torchrun(["--strategy", "fsdp2", "--share-prompts"], tmp_path / "shared.json")
    assert_same_losses(run["steps"], single_run[0]["steps"])


def test_single_checkpoint_resumes_to_the_same_next_loss(single_run):
    reference, ckpt = single_run
    resumed = train("single", load=str(ckpt), steps=2)
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in reference["steps"][2:]]  # bit-exact
    assert [r["lr"] for r in resumed["steps"]] == [r["lr"] for r in reference["steps"][2:]]


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of.*deepspeed.*fsdp2.*single"):
        make_strategy("zero")


def test_deepspeed_strategy_without_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    monkeypatch.delitem(sys.modules, "winnow.learner.deepspeed", raising=False)
    with pytest.raises(ImportError, match=r'pip install "winnow\[deepspeed\]"'):
        make_strategy("deepspeed", "cpu")


# ---------------------------------------------------------------------- weight sync


def test_iter_buckets_groups_in_order_and_never_splits_a_tensor():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)), ("d", torch.zeros(5))]
    # float32: 40, 40, 120, 20 bytes; buckets of at most 100 bytes -> [a, b], [c] (alone, too big), [d]
    buckets = list(iter_buckets(tensors, bucket_bytes=100))
    assert [[name for name, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]
    assert [[name for name, _ in b] for b in iter_buckets(tensors, bucket_bytes=10**6)] == [["a", "b", "c", "d"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(tensors, bucket_bytes=0))


def _trained_learner(tiny_model) -> Learner:
    learner = Learner(tiny_model, LearnerConfig(lr=3e-3, micro_batch_size=4), total_steps=4, device="cpu")
    learner.train_step(fixed_batch(), make_loss_fn())  # weights now differ from the engines' copies
    return learner


def test_bucketed_sync_equals_one_call_and_reports_metrics(tiny_model, tiny_tokenizer):
    initial = copy.deepcopy(tiny_model)
    learner = _trained_learner(tiny_model)
    bucketed, whole = HFEngine(initial, tiny_tokenizer), HFEngine(initial, tiny_tokenizer)
    metrics = sync_weights(learner, bucketed, bucket_mb=0.25)
    whole.update_weights(learner.named_weights())
    num_bytes = sum(p.numel() * 4 for p in learner.model.parameters())
    assert metrics["sync/bytes"] == num_bytes
    assert metrics["sync/num_buckets"] >= num_bytes / 2**20 / 0.25 > 1  # several calls, none over 0.25 MiB
    assert metrics["sync/seconds"] > 0
    for (name, a), (_, b) in zip(bucketed.model.named_parameters(), whole.model.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a, dict(learner.model.named_parameters())[name]), name


def test_bucketed_sync_that_misses_a_parameter_fails_on_the_last_bucket(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer)
    named = list(tiny_model.named_parameters())
    engine.update_weights(named[:2], is_last_bucket=False)
    with pytest.raises(KeyError, match="left 1 parameters stale"):
        engine.update_weights(named[3:], is_last_bucket=True)
    engine.update_weights(named)  # and the next sync starts afresh


def test_verify_sync_passes_after_a_sync_and_catches_a_corrupted_or_missing_one(tiny_model, tiny_tokenizer):
    initial = copy.deepcopy(tiny_model)
    learner = _trained_learner(tiny_model)
    engine = HFEngine(initial, tiny_tokenizer)
    probe = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    with pytest.raises(SyncError, match="not running the learner's weights"):  # never synced: stale
        verify_sync(engine, learner, probe, tolerance=1e-4)
    sync_weights(learner, engine)
    metrics = verify_sync(engine, learner, probe, tolerance=1e-4)
    assert metrics["sync/logprob_diff_max"] < 1e-4  # fp32 on CPU: the same numbers up to summation order
    # Corrupt the sync the way name mix-ups do: two same-shaped tensors loaded under each other's names.
    named = dict(learner.named_weights())
    swapped = {**named, "model.layers.0.self_attn.q_proj.weight": named["model.layers.1.self_attn.q_proj.weight"],
               "model.layers.1.self_attn.q_proj.weight": named["model.layers.0.self_attn.q_proj.weight"]}
    engine.update_weights(swapped.items())
    with pytest.raises(SyncError, match=r"differ from the learner's by .* tolerance 0.0001"):
        verify_sync(engine, learner, probe, tolerance=1e-4)


# ---------------------------------------------------------------------- the training loop under torchrun

ONES_REWARD = '''
def dense(prompts, completions, **columns):
    """A reward that varies on a random model's outputs, so advantages (and the update) are not all zero."""
    return [sum(map(ord, c)) % 7 / 6 for c in completions]
'''


@pytest.mark.slow
def test_cli_train_under_torchrun_matches_one_process(tmp_path):
    """`torchrun -m winnow.cli train grpo --learner.strategy fsdp2` runs the loop on 2 ranks: on CPU every
    rank samples the same batch, each trains on half (2 epochs of one step), and the logged rewards and losses
    are the single process's; the sync check passes every iteration and rank 0 alone writes the run."""
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
    from winnow.logging import read_metrics

    tokenizer = train_char_tokenizer(["0123456789+-*= "], include_all_bytes=True)
    save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "tiny")
    (tmp_path / "rewards.py").write_text(ONES_REWARD)
    flags = ["train", "grpo", "--model.path", str(tmp_path / "tiny"), "--data.train", "arithmetic",
             "--oracle.rewards", f"{tmp_path / 'rewards.py'}:dense", "--rollout.prompts-per-iteration", "8",
             "--rollout.num-samples", "4", "--rollout.max-tokens", "6", "--learner.lr", "1e-3",
             "--learner.micro-batch-size", "6", "--learner.num-epochs", "2",
             "--sync.check-sync", "--sync.check-tolerance", "1e-4",
             "--sync.bucket-mb", "0.5", "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "8",
             "--num-iterations", "3", "--device", "cpu", "--output-dir", str(tmp_path), "--logging.no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "winnow.cli", *flags, "--run-name", "single"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "winnow.cli",
         *flags, "--run-name", "fsdp2", "--learner.strategy", "fsdp2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert sharded.stdout.count("run written to") == 1
    want, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for w, g in zip(want[1:], got[1:]):
        assert g["reward/mean"] == pytest.approx(w["reward/mean"], abs=1e-6)
        # With one step per epoch GRPO's loss is 0 (ratio 1, advantages summing to 0 per group); the second
        # epoch's ratios are not 1, so the loss and the gradient say whether the updates were the same.
        assert abs(w["train/loss"]) > 1e-5 and w["train/grad_norm"] > 1e-3
        assert g["train/loss"] == pytest.approx(w["train/loss"], rel=1e-4, abs=1e-8)
        assert g["train/grad_norm"] == pytest.approx(w["train/grad_norm"], rel=REL_TOL)
        assert g["sync/logprob_diff_max"] < 1e-4 and g["sync/num_buckets"] > 1
    assert w["reward/mean"] != want[1]["reward/mean"]  # later iterations sample from updated weights
    assert (tmp_path / "fsdp2" / "final" / "model.safetensors").exists()
