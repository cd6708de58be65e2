"""Fault injection: each fault a user can meet, and what it gets (the README's "Faults and what they get" table).

Every case asserts that nothing is lost or applied silently and that the message is the documented one.
CPU, tiny models, a few iterations: the whole file takes about a minute.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from winnow.algorithms import GRPO
from winnow.algorithms.gae import clipped_value_loss
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig, NonFiniteLossError
from winnow.loops.config import RolloutConfig
from winnow.loops.rl import RLFamily
from winnow.oracles.functions import FunctionOracle, RewardFunctionError
from winnow.oracles.rules import exact_match_reward
from winnow.types import Completion, Group, Prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from winnow.data import build_tiny_model, make_task, save_tiny, train_char_tokenizer

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for q, a in task.examples("train")][:500])
    return str(save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("tiny")))


def _completion(text: str) -> Completion:
    return Completion([3], [4] * len(text), [0.0] * len(text), "stop", text)


def _batch(tokenizer, num: int = 4):
    completions = [Completion(tokenizer.encode("1+2="), tokenizer.encode(str(i % 10)), [0.0], "stop", str(i % 10))
                   for i in range(num)]
    rewards = torch.tensor([1.0, 0.0] * (num // 2))
    batch = make_train_batch(completions, None, rewards, tokenizer.pad_token_id,
                             group_index=torch.zeros(num, dtype=torch.long))
    batch.advantages = rewards - rewards.mean()  # [B]
    return batch


# ---------------------------------------------------------------------- non-finite losses and gradients

def _nan_loss(logprobs, micro_batch, *, num_sequences, num_tokens):
    return (logprobs * micro_batch.response_mask).sum() * float("nan"), {}


class _InfGrad(torch.autograd.Function):
    """Forward 0, backward inf: a finite loss whose gradient norm is not finite."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _inf_grad_loss(logprobs, micro_batch, *, num_sequences, num_tokens):
    return _InfGrad.apply(logprobs).sum(), {}


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_fn", [_nan_loss, _inf_grad_loss], ids=["nan-loss", "inf-grad-norm"])
def test_a_non_finite_step_is_skipped_counted_and_stops_the_run_after_max_bad_steps(tiny_model, tiny_tokenizer,
                                                                                    loss_fn):
    learner = Learner(tiny_model, LearnerConfig(lr=1e-2, max_bad_steps=2), total_steps=4, device="cpu")
    before = _weights(learner.model)
    metrics = learner.train_step(_batch(tiny_tokenizer), loss_fn)
    # never applied: weights, optimizer state and schedule untouched; counted
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(learner.model)))
    assert learner.optimizer.state == {} and learner.scheduler.last_epoch == 0
    assert metrics["skipped_steps"] == 1.0 and learner.num_steps == 0 and learner.num_skipped_steps == 1
    with pytest.raises(NonFiniteLossError, match=r"2 optimizer steps in a row had a non-finite loss or gradient "
                                                 r"norm .* none was applied\. .*--learner\.max-bad-steps"):
        learner.train_step(_batch(tiny_tokenizer), loss_fn)


def test_a_good_step_resets_the_bad_step_count_and_is_applied(tiny_model, tiny_tokenizer):
    learner = Learner(tiny_model, LearnerConfig(lr=1e-2, max_bad_steps=2), total_steps=4, device="cpu")
    good = partial(GRPO().loss, max_tokens=4)
    learner.train_step(_batch(tiny_tokenizer), _nan_loss)
    metrics = learner.train_step(_batch(tiny_tokenizer), good)
    assert metrics["skipped_steps"] == 0.0 and learner.num_steps == 1 and learner.num_bad_steps_in_a_row == 0
    learner.train_step(_batch(tiny_tokenizer), _nan_loss)  # one bad step again: no error, 1 in a row
    assert learner.num_skipped_steps == 2 and learner.num_bad_steps_in_a_row == 1


def test_train_policy_sums_skipped_steps_and_skips_empty_mini_batches(tiny_model, tiny_tokenizer):
    # 2 samples, 4 mini-batches: two are empty (dropped groups leave few samples); no KeyError, 2 steps
    learner = Learner(tiny_model, LearnerConfig(lr=1e-2, num_mini_batches=4), total_steps=4, device="cpu")
    metrics = learner.train_policy(_batch(tiny_tokenizer, num=2), partial(GRPO().loss, max_tokens=4))
    assert learner.num_steps == 2 and metrics["skipped_steps"] == 0.0


def test_non_finite_metrics_stay_valid_json(tmp_path):
    from winnow.logging import LoggingConfig, MetricsLogger, read_metrics

    with MetricsLogger(tmp_path, LoggingConfig(), "run", {}) as logger:
        logger.log({"train/loss": float("nan"), "train/grad_norm": float("inf")}, step=1)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON: jq and pandas read it
    assert line == {"step": 1, "train/loss": None, "train/grad_norm": None,
                    "nonfinite": {"train/loss": "NaN", "train/grad_norm": "Infinity"}}
    assert read_metrics(tmp_path)[0]["train/grad_norm"] == float("inf")


# ---------------------------------------------------------------------- value clipping

def test_value_clip_fraction_counts_no_clip_inside_the_range():
    # old - c = 0.2 - 0.2 = 0 <= V = 0.017999952659: inside the range, so not clipped. The old formula
    # old + clamp(V - old, -c, c) gave 0.018000006 != V in float32, and counted it.
    mask = torch.ones(1, 1)
    value = torch.tensor([[0.017999952659]])
    _, metrics = clipped_value_loss(value, torch.tensor([[0.2]]), torch.tensor([[1.7]]), mask, clip=0.2)
    assert metrics["value_clip_fraction"] == 0.0
    # V=0.5, old=0.2, R=1: clipped V 0.4, (0.4-1)^2 = 0.36 > (0.5-1)^2 = 0.25: the clipped term wins, 1 of 1
    _, metrics = clipped_value_loss(torch.tensor([[0.5]]), torch.tensor([[0.2]]), torch.ones(1, 1), mask, clip=0.2)
    assert metrics["value_clip_fraction"] == 1.0


# ---------------------------------------------------------------------- rewards

def test_finite_rewards_that_sum_to_inf_are_rejected_like_nan():
    big = lambda prompts, completions, **_: [1e308] * len(completions)  # noqa: E731
    oracle = FunctionOracle([("a", big, 1.0), ("b", big, 1.0)])
    with pytest.raises(RewardFunctionError, match=r"weighted sum of rewards .* is inf: scores must be finite"):
        oracle.reward(["p"], ["c"], [None])


def test_a_reward_function_that_fails_on_every_call_is_an_error_after_its_retries():
    def broken(prompts, completions, **_):
        raise ConnectionError("grader down")

    oracle = FunctionOracle([("broken", broken, 1.0)], max_retries=1, retry_backoff=0.0, max_failed_calls=2)
    assert oracle.reward(["p"], ["c"], [None]).scores == [None]  # once: unscored, a transient failure
    with pytest.raises(RewardFunctionError, match=r"reward 'broken' raised on every attempt of its last 2 calls "
                                                  r"\(2 attempts each, --oracle.max-retries 1\); last error: "
                                                  r"ConnectionError\('grader down'\)"):
        oracle.reward(["p"], ["c"], [None])


def _family(**rollout) -> RLFamily:
    return RLFamily(actor=None, learner=None, oracle=None, objective=GRPO(), rollout=RolloutConfig(**rollout),
                    eval_config=None, prompts=iter([]), eval_prompts=[], seed=0, pad_token_id=0)


def _group(rewards) -> Group:
    return Group(Prompt("1+1=", [3], "2"), [_completion(str(i)) for i in range(len(rewards))], list(rewards), {})


def test_a_reward_beyond_float32_is_refused_not_trained_as_inf():
    with pytest.raises(ValueError, match=r"a reward of 1e\+39 does not fit a float32"):
        _family().advantages([_group([1e39, 0.0])])


def test_every_dropped_group_is_counted_and_the_idle_reason_says_why():
    family = _family(drop_uniform_groups=True)
    # a group with 1 scored sample (dropped: a baseline needs 2), a uniform one (dropped), a useful one
    batch, metrics = family.advantages([_group([1.0, None]), _group([0.0, 0.0]), _group([1.0, 0.0])])
    assert metrics["rollout/dropped_groups"] == 2.0 and metrics["rollout/uniform_groups"] == 1.0
    assert batch.batch_size == 2 and family.idle_reason == ""
    batch, _ = family.advantages([_group([None, None]), _group([None, None])])
    assert batch is None and family.idle_reason.startswith("every sample was unscored")
    family = _family()
    batch, metrics = family.advantages([_group([1.0, 1.0]), _group([0.0, 0.0])])
    # kept (no --rollout.drop-uniform-groups) but all advantages are 0: idle, and why
    assert metrics["rollout/dropped_groups"] == 0.0 and batch.batch_size == 4
    assert family.idle_reason.startswith("every group's rewards were equal, so every advantage is 0")


# ---------------------------------------------------------------------- data

def _rows(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompts_with_characters_the_tokenizer_cannot_encode(tmp_path, tiny_tokenizer, caplog):
    from winnow.data import DataConfig, load_prompts

    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "one+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(DataConfig(train=_rows(tmp_path, rows), eval_fraction=0), tiny_tokenizer)
    assert len(prompts) == 3  # kept, with a warning that counts them and shows the first
    assert "1 of 3 prompts from" in caplog.text and "row 1, 'one+2='" in caplog.text
    rows.append({"prompt": "abc", "answer": "0"})
    with pytest.raises(ValueError, match=r"row 3: the prompt 'abc' is empty once tokenized"):
        load_prompts(DataConfig(train=_rows(tmp_path, rows), eval_fraction=0), tiny_tokenizer)


def test_a_row_without_an_answer_is_reported_at_load_time_with_its_row():
    from winnow.recipes.base import check_answers

    oracle = FunctionOracle([("exact", exact_match_reward, 1.0)])
    prompts = [Prompt("1+1=", [3], "2", {}, 0), Prompt("2+2=", [3], None, {}, 7)]
    with pytest.raises(ValueError, match=r"reward 'exact' compares responses with reference answers, but 1 of 2 "
                                         r"rows of 'data.jsonl' have none \(first: row 7\); set --data.answer-column"):
        check_answers(oracle, prompts, "data.jsonl")
    check_answers(FunctionOracle([("len", lambda p, c, **_: [0.0] * len(c), 1.0)]), prompts, "x")  # needs none


# ---------------------------------------------------------------------- the command line

def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from winnow.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _train_args(model_dir: str, tmp_path, *extra: str) -> list[str]:
    return ["train", "grpo", "--model.path", model_dir, "--output-dir", str(tmp_path), "--device", "cpu",
            "--rollout.prompts-per-iteration", "4", "--rollout.num-samples", "2", "--rollout.max-tokens", "4",
            "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "4", "--no-save-final", *extra]


def test_a_missing_model_directory_is_one_message_and_exit_2_at_once(capsys, tmp_path):
    start = time.monotonic()
    code, _, err = _cli(capsys, "eval", "--model.path", str(tmp_path / "no-such-model"), "--device", "cpu")
    assert time.monotonic() - start < 5  # no hub retries
    assert code == 2 and "Traceback" not in err
    assert f"winnow: error: --model.path {tmp_path / 'no-such-model'}: the directory does not exist" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="the directory does not exist"):
        from winnow.cli import main

        main(["eval", "--model.path", str(tmp_path / "nope"), "--debug"])


@pytest.mark.parametrize("flags, message", [
    (["--rollout.num-samples", "1"], "--rollout.num-samples 1 with grpo, whose baseline is the group's mean"),
    (["--learner.num-mini-batches", "9"], "--learner.num-mini-batches 9 is more than the 8 samples an iteration "
                                          "yields"),
    (["--learner.micro-batch-size", "0"], "--learner.micro-batch-size 0 must be >= 1"),
    (["--rollout.num-samples", "0"], "--rollout.num-samples 0 must be >= 1"),
])
def test_config_errors_name_the_flag_and_exit_2(capsys, model_dir, tmp_path, flags, message):
    code, _, err = _cli(capsys, *_train_args(model_dir, tmp_path, *flags))
    assert code == 2 and "Traceback" not in err and message in err, err


def _reward_file(tmp_path, body: str) -> str:
    path = tmp_path / "rewards.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:reward"


def test_a_run_that_trains_nothing_stops_with_the_reason(capsys, model_dir, tmp_path):
    rewards = _reward_file(tmp_path, """
        def reward(prompts, completions, **columns):
            return [0.0] * len(completions)
    """)
    code, out, err = _cli(capsys, *_train_args(model_dir, tmp_path, "--oracle.rewards", rewards,
                                               "--num-iterations", "5", "--rollout.max-idle-iterations", "2"))
    assert code == 1 and "Traceback" not in err
    assert ("winnow: stopped: 2 iterations in a row trained nothing: every group's rewards were equal, so every "
            "advantage is 0") in err
    assert "--rollout.max-idle-iterations allows more" in err


def test_piped_output_prints_one_line_per_iteration(capsys, model_dir, tmp_path):
    rewards = _reward_file(tmp_path, """
        def reward(prompts, completions, **columns):
            return [float(sum(map(ord, c)) % 3) for c in completions]
    """)
    code, out, err = _cli(capsys, *_train_args(model_dir, tmp_path, "--oracle.rewards", rewards,
                                               "--num-iterations", "2"))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert [line.split()[1] for line in lines] == ["0/2", "1/2", "2/2"]
    assert lines[1].split()[2] == "reward" and "  loss " in lines[1]  # reward/mean and train/loss


# ---------------------------------------------------------------------- processes

def test_the_math_grader_works_from_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "grade_at_top_level.py"
    script.write_text("from winnow.oracles.math import grade\nprint(grade('\\\\boxed{2}', '2'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_serve_oracle_leaves_nothing_serving_on_the_port(tmp_path):
    pytest.importorskip("mosec")
    import urllib.request

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.rewards", "exact",
                               "--port", str(port), "--num-workers", "1"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:  # up once the pipeline answers /health
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/health", data=b"", method="POST")
                if urllib.request.urlopen(request, timeout=2).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve-oracle did not come up"
                time.sleep(0.5)
        children = _children(server.pid)
        assert len(children) >= 3  # Mosec's controller, the ingress and the oracle workers
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in (Path(f"/proc/{pid}/stat").read_text().split()[2:3])
                  for pid in children):
            assert time.monotonic() < deadline, "orphans left running after kill -9"
            time.sleep(0.2)
        with pytest.raises(OSError):  # nothing answers on the port any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
