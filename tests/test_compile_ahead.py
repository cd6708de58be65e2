"""Compile ahead: the run's numbered gates against its helpers, the memory formats' stable pickling, and a real run
whose helpers fill torch's compile caches so that the run itself compiles nothing (CPU, Inductor's C++ backend)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from winnow import compile_ahead
from winnow.compile_ahead import _Helper, _Helpers


def _sleeper(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_the_run_waits_for_its_helpers_marker_then_goes_on_alone_once_the_helper_ended(tmp_path):
    # The helper finishes call 1 after ~0.5 s, then exits without reaching call 2.
    helper = _sleeper(f"import time, pathlib; time.sleep(0.5); pathlib.Path({str(tmp_path / 'engine-1')!r}).touch(); "
                      f"time.sleep(0.3)")
    helpers = _Helpers(tmp_path, processes={"engine": helper})
    start = time.perf_counter()
    helpers.wait("engine")
    assert (tmp_path / "engine-1").exists() and time.perf_counter() - start >= 0.4
    helpers.wait("engine")  # no marker 2: returns when the helper exits, and the part is the run's own from then on
    assert helper.poll() == 0 and "engine" not in helpers.processes
    start = time.perf_counter()
    helpers.wait("engine")
    assert time.perf_counter() - start < 0.1
    helpers.wait("learner")  # a part without a helper never waits
    helpers.stop()
    assert not tmp_path.exists()  # nothing failed: the folder goes


def test_a_failed_helper_is_reported_and_its_log_kept(tmp_path, caplog):
    helpers = _Helpers(tmp_path, processes={"learner": _sleeper("import sys; sys.exit(3)")})
    (tmp_path / "learner.log").write_text("Traceback ...")
    with caplog.at_level(logging.WARNING, logger="winnow.compile_ahead"):
        helpers.wait("learner")
    assert "the learner helper failed (exit 3" in caplog.text and str(tmp_path / "learner.log") in caplog.text
    helpers.stop()
    assert (tmp_path / "learner.log").exists()


def test_the_run_waits_for_every_helper_of_a_part(tmp_path):
    # Two learner helpers: one marks call 1 after ~0.2 s, the other after ~0.6 s; the kernels helper gates nothing.
    touch = "import time, pathlib; time.sleep({}); pathlib.Path({!r}).touch(); time.sleep(5)"
    helpers = _Helpers(tmp_path, processes={
        "learner": _sleeper(touch.format(0.2, str(tmp_path / "learner-1"))),
        "learner-padded": _sleeper(touch.format(0.6, str(tmp_path / "learner-padded-1"))),
        "kernels": _sleeper("import time; time.sleep(5)")})
    start = time.perf_counter()
    helpers.wait("kernels")  # no part of that name: nothing to wait for
    assert time.perf_counter() - start < 0.1
    helpers.wait("learner")
    assert time.perf_counter() - start >= 0.5 and (tmp_path / "learner-padded-1").exists()
    assert helpers.passed == {"learner": 1}
    helpers.stop()


def test_a_helper_that_ends_on_its_own_with_an_error_is_reported_when_the_run_stops(tmp_path, caplog):
    helpers = _Helpers(tmp_path, processes={"kernels": _sleeper("import sys; sys.exit(2)")})
    helpers.processes["kernels"].wait()
    with caplog.at_level(logging.WARNING, logger="winnow.compile_ahead"):
        helpers.stop()
    assert "the kernels helper failed (exit 2" in caplog.text and tmp_path.exists()


def test_finished_helpers_leave_a_record_and_a_launch_that_finds_it_starts_none(tmp_path, monkeypatch, caplog):
    from winnow.algorithms import OBJECTIVES
    from winnow.recipes.rl import TrainConfig

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = TrainConfig(algo=OBJECTIVES["grpo"]())
    config.engine.compile_decode, config.learner.compile, config.device = True, True, "cuda"
    config.model.path = str(tmp_path / "model")
    record = compile_ahead.record_path(config)
    assert record.parent == tmp_path / "inductor" / "winnow-compile-ahead"
    assert compile_ahead.record_path(replace(config, output_dir="elsewhere", run_name="again")) == record
    assert compile_ahead.record_path(replace(config, rollout=replace(config.rollout, max_tokens=99))) != record
    # A helper still running when the run stops (killed) or one that failed: no record.
    for code in ("import time; time.sleep(5)", "import sys; sys.exit(1)"):
        helpers = _Helpers(tmp_path / "helpers", processes={"engine": _sleeper(code)}, record=record)
        time.sleep(0.3)
        helpers.stop()
        assert not record.exists()
    helpers = _Helpers(tmp_path / "helpers", processes={"engine": _sleeper("pass"), "kernels": _sleeper("pass")},
                       record=record)
    for process in helpers.processes.values():
        process.wait()
    helpers.stop()
    assert record.exists()
    with caplog.at_level(logging.INFO, logger="winnow.compile_ahead"):
        compile_ahead.start(config)  # a GPU run whose graphs an earlier launch compiled: nothing spawned
    assert compile_ahead._role is None and "no helpers" in caplog.text


def test_a_helper_numbers_its_calls_as_they_begin_and_marks_them_as_they_end(tmp_path):
    helper = _Helper("learner", tmp_path, spawned_at=time.time())
    with helper.call("learner"):  # train_policy, which runs a no-grad forward inside it
        with helper.call("learner"):
            pass
        assert sorted(p.name for p in tmp_path.iterdir()) == ["learner-2"]
    with helper.call("engine"):  # another part's calls are not this helper's to mark
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learner-1", "learner-2"]
    padded = _Helper("learner-padded", tmp_path, spawned_at=time.time())  # marks under its own name
    with padded.call("learner"):
        pass
    assert (tmp_path / "learner-padded-1").exists()


def test_the_learner_helper_makes_up_full_length_responses_and_pads_the_last():
    from winnow.recipes.compile_ahead import _FullLengthResponses
    from winnow.types import SamplingParams

    completions = _FullLengthResponses(actor=None).generate([[5, 6], [7]], SamplingParams(max_tokens=4, n=2))
    assert [c.response_ids for c in completions] == [[6] * 4, [6] * 4, [7] * 4, [7] * 3]
    assert [c.finish_reason for c in completions] == ["length"] * 3 + ["stop"]
    assert [c.prompt_ids for c in completions] == [[5, 6], [5, 6], [7], [7]]
    assert all(c.logprobs == [-1.0] * c.num_tokens for c in completions)
    full = _FullLengthResponses(actor=None, pad_last=False).generate([[5, 6], [7]], SamplingParams(max_tokens=4, n=2))
    assert [c.response_ids for c in full] == [[6] * 4, [6] * 4, [7] * 4, [7] * 4]
    assert [c.finish_reason for c in full] == ["length"] * 4


def test_the_padded_micro_batch_has_a_helper_of_its_own_where_micro_batches_are_rows():
    from winnow.algorithms import OBJECTIVES
    from winnow.recipes.compile_ahead import helper_config
    from winnow.recipes.rl import TrainConfig

    config = TrainConfig(algo=OBJECTIVES["grpo"]())
    config.engine.compile_decode, config.learner.compile, config.model.path = True, True, "Qwen/Qwen2.5-1.5B"
    config.rollout.prompts_per_iteration, config.rollout.num_samples, config.learner.micro_batch_size = 64, 8, 32
    assert compile_ahead.padded_apart(config) == 4  # 4 prompts x 8 samples: one micro-batch of 32
    assert compile_ahead.helpers_to_start(config) == ["engine", "kernels", "learner", "learner-padded"]
    padded, full = helper_config(config, "learner-padded"), helper_config(config, "learner")
    assert (padded.rollout.prompts_per_iteration, padded.rollout.num_samples) == (4, 8)
    assert (full.rollout.prompts_per_iteration, full.rollout.num_samples) == (64, 2)
    assert padded.learner.compile and not padded.engine.compile_decode and padded.num_iterations == 1
    engine = helper_config(config, "engine")
    assert engine.engine.compile_decode and not engine.learner.compile and engine.rollout == config.rollout
    for learner in (replace(config.learner, micro_batch_size=12),  # 12 rows: not whole prompts' samples
                    replace(config.learner, micro_batch_tokens=4096), replace(config.learner, num_mini_batches=2),
                    replace(config.learner, micro_batch_size=1024)):  # more rows than the run has
        assert compile_ahead.padded_apart(replace(config, learner=learner)) is None
        assert compile_ahead.helpers_to_start(replace(config, learner=learner)) == ["engine", "kernels", "learner"]
    assert compile_ahead.helpers_to_start(replace(config, engine_backend="vllm")) == ["learner", "learner-padded"]
    assert compile_ahead.helpers_to_start(replace(config, model=replace(config.model, path=None))) == []
    hf_loop = replace(config, engine=replace(config.engine, decode="hf"))  # launches no kernel of winnow's
    assert compile_ahead.helpers_to_start(hf_loop) == ["engine", "learner", "learner-padded"]


def test_the_learner_helper_samples_fewer_per_prompt_only_where_micro_batches_keep_their_shape():
    from winnow.algorithms import OBJECTIVES
    from winnow.recipes.compile_ahead import learner_samples
    from winnow.recipes.rl import TrainConfig

    config = TrainConfig(algo=OBJECTIVES["grpo"]())
    config.rollout.prompts_per_iteration, config.rollout.num_samples, config.learner.micro_batch_size = 64, 8, 32
    assert learner_samples(config) == 2  # 128 rows: four whole micro-batches of 32, not sixteen
    config.rollout.prompts_per_iteration = 16
    assert learner_samples(config) == 4  # 64 rows: two micro-batches
    config.rollout.prompts_per_iteration = 12
    assert learner_samples(config) == 8  # 96 rows: 12 x 2 or 12 x 4 would leave a part micro-batch
    config.rollout.prompts_per_iteration = 64
    for learner in (replace(config.learner, micro_batch_tokens=4096), replace(config.learner, share_prompts=True),
                    replace(config.learner, num_mini_batches=2)):
        assert learner_samples(replace(config, learner=learner)) == 8


def test_gates_do_nothing_without_helpers():
    assert compile_ahead._role is None
    with compile_ahead.stage("engine"):
        pass


def test_memory_formats_pickle_by_name_and_load_back():
    compile_ahead.pickle_memory_formats_by_name()
    for memory_format in (torch.contiguous_format, torch.channels_last, torch.preserve_format):
        data = pickle.dumps(memory_format)
        assert b"memory_format_named" in data and pickle.loads(data) is memory_format


def test_helpers_start_only_where_the_device_may_be_a_gpu():
    assert compile_ahead.may_run_on("auto") and compile_ahead.may_run_on("cuda") and compile_ahead.may_run_on("cuda:1")
    assert not compile_ahead.may_run_on("cpu")


def test_parts_to_compile_follow_the_run_config():
    from winnow.algorithms import OBJECTIVES
    from winnow.recipes.rl import TrainConfig

    config = TrainConfig(algo=OBJECTIVES["grpo"]())
    assert compile_ahead.parts_to_compile(config) == []  # nothing compiled
    config.engine.compile_decode, config.learner.compile = True, True
    assert compile_ahead.parts_to_compile(config) == ["engine", "learner"]
    assert compile_ahead.parts_to_compile(replace(config, engine_backend="vllm")) == ["learner"]
    assert compile_ahead.parts_to_compile(replace(config, compile_ahead=False)) == []
    assert compile_ahead.parts_to_compile(replace(config, runtime="ray")) == []
    assert compile_ahead.parts_to_compile(replace(config, resume="auto")) == []


RUN = """
import json, sys
import winnow.compile_ahead as compile_ahead
compile_ahead.DEVICE_TYPES = ("cuda", "cpu")
import torch._dynamo.utils as dynamo_utils
from winnow.cli import main
try:
    main(sys.argv[1:])
finally:
    print("COUNTERS " + json.dumps(dict(dynamo_utils.counters["inductor"])))
"""


@pytest.mark.slow
def test_a_compiling_run_finds_its_graphs_compiled_by_its_helpers(tmp_path):
    """The engine's decode glue and the learner's layers and head, compiled on CPU with empty caches: the helpers
    compile every graph of the first iteration, and the run reads them all from the cache (a miss would mean the
    replay traced another graph, or that the cache keys differ between the processes)."""
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    tokenizer = train_char_tokenizer(["0123456789+= "])
    save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "model")
    # Prompts of several lengths: every batch is padded, in the run and in its helpers.
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (13, 4), (250, 31), (7, 77)] * 8]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "reward.py").write_text("def odd(prompts, completions, reference, **columns):\n"
                                        "    return [float(len(c) % 2) for c in completions]\n")
    (tmp_path / "run.py").write_text(RUN)
    command = [sys.executable, str(tmp_path / "run.py"), "train", "grpo", "--model.path", str(tmp_path / "model"),
               "--data.train", str(tmp_path / "prompts.jsonl"),
               "--oracle.rule.rewards", f"{tmp_path / 'reward.py'}:odd",
               "--device", "cpu", "--engine.decode", "static", "--engine.compile-decode", "--learner.compile",
               "--learner.compile-dynamic", "--learner.micro-batch-size", "8", "--rollout.prompts-per-iteration", "4",
               "--rollout.num-samples", "4",
               "--rollout.max-tokens", "3", "--eval.every", "0", "--eval.max-prompts", "4", "--num-iterations", "1",
               "--logging.no-progress", "--no-save-final", "--output-dir", str(tmp_path / "runs"), "--run-name", "run"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counters = json.loads(done.stdout.split("COUNTERS ")[-1])
    assert "helper processes (engine, kernels, learner, learner-padded)" in done.stderr
    assert counters.get("fxgraph_cache_hit", 0) >= 4, (counters, done.stderr[-3000:])
    assert counters.get("fxgraph_cache_miss", 0) == 0, (counters, done.stderr[-3000:])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in rows)  # the run trained, on the graphs its helpers compiled
    logs = tmp_path / "runs" / "run" / "compile_ahead"  # the helpers' logs, kept with the run
    assert "learner call 2 done" in (logs / "learner.log").read_text()
    assert "learner call 2 done" in (logs / "learner-padded.log").read_text()  # one micro-batch of 8: 2 prompts x 4
    assert "no GPU here" in (logs / "kernels.log").read_text()
    assert "engine call 1 done" in (logs / "engine.log").read_text()
