"""Oracles: answer extraction, math grading (equivalent forms, garbage, a real hang), reward rules,
FunctionOracle's weighting, retries and errors, and reward specs."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from winnow.oracles import (FunctionOracle, OracleConfig, RuleOracleConfig, extract_answer, grade, load_reward_function,
                            make_oracle)
from winnow.oracles.functions import RewardFunctionError
from winnow.oracles.math import MathGrader, MathReward, math_reward
from winnow.oracles.rules import MissingReferenceError, boxed_format_reward, exact_match_reward

# Comparing 9^(9^9), a number of 370 million digits, with anything sends sympy computing: with
# math-verify's own time limits off it was still running when killed at 60 s.
HANGS = r"so the answer is \boxed{9^{9^{9}}}"
SAFE_TIMEOUT = 30.0  # for tests about values, not time: a loaded 2-core machine must not flip them


@pytest.fixture(scope="module")
def grader():
    with MathGrader(num_workers=2, timeout=1.0) as pool:
        yield pool


@pytest.mark.parametrize("response, answer", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),                  # nested braces
    (r"first \boxed{3}, no: \boxed{4}", "4"),                      # the last box wins
    (r"\boxed{\boxed{7}}", "7"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed {\{1, 2\}}", r"\{1, 2\}"),                           # escaped braces are content
    (r"\boxed{4} then \boxed{\frac{1}{", None),                    # unclosed last box: no answer
    (r"\boxed{}", None),
    (r"The answer is $\frac{1}{2}$. Done", r"\frac{1}{2}"),        # "answer is", up to the sentence's end
    ("Thus the answer is 0.5.", "0.5"),                            # a decimal point does not end it
    ("2 apples plus 1,000 pears", "1,000"),                        # else the last number
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


# (response, reference, is_correct)
GRADE_CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "3/4", True),
    (r"\boxed{2x+2}", "2(x+1)", True),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", True),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{4}", r"$\boxed{4}$", True),                          # a boxed reference is unboxed first
    (r"we get \boxed{3}, then \boxed{\frac{\frac{1}{2}}{2}}", "0.25", True),
    (r"\boxed{5} no wait, \boxed{6}", "5", False),                 # the last box is the answer
    (r"\boxed{5} no wait, \boxed{6}", "6", True),
    ("The answer is 42.", "42", True),
    ("2 + 2 = 4", "4", True),
    (r"\boxed{0.5000001}", "0.5", True),                           # math-verify rounds floats to 6 places
    (r"\boxed{0.51}", "0.5", False),
    (r"\boxed{3}", "4", False),
    (r"\boxed{2x+1}", "2(x+1)", False),
    ("", "4", False),
    ("ü∂ß😀 ∑∫ \x00 \u202e", "4", False),
    (r"\boxed{\frac{1}{", "0.5", False),
    (r"}}{{\boxed{{{", "4", False),
    (r"\boxed{}", "0", False),
]


def test_grade_batch_accepts_equivalent_forms_and_rejects_wrong_or_garbage(grader):
    responses, references, expected = zip(*GRADE_CASES)
    assert grader.grade_batch(responses, references, timeout=SAFE_TIMEOUT) == list(expected)


def test_grade_returns_bools():
    assert grade(r"so \boxed{\frac{1}{2}}", "0.5", timeout=SAFE_TIMEOUT) is True
    assert grade(r"so \boxed{3}", "0.5", timeout=SAFE_TIMEOUT) is False


def test_grade_counts_a_hanging_answer_as_wrong_within_its_timeout():
    grade("\\boxed{1}", "1", timeout=SAFE_TIMEOUT)  # start the default grader outside the timing
    start = time.monotonic()
    assert grade(HANGS, "5", timeout=1.0) is False
    assert time.monotonic() - start < 1.0 + 2.0
    assert grade(r"\boxed{5}", "5", timeout=SAFE_TIMEOUT) is True  # its replacement worker grades


def test_grade_batch_gives_up_on_a_hanging_item_only(grader):
    num_restarts = grader.num_restarts
    start = time.monotonic()
    results = grader.grade_batch([r"\boxed{1}", HANGS, r"\boxed{3}", r"\boxed{9}", "4"],
                                 ["1", "5", "3", "4", "4"], timeout=1.0)
    assert results == [True, None, True, False, True]
    assert time.monotonic() - start < 1.0 + 2.0  # the other worker graded the rest meanwhile
    assert grader.num_restarts == num_restarts + 1
    assert grader.grade_batch([r"\boxed{2}"] * 3, ["2", "1", "2"], timeout=SAFE_TIMEOUT) == [True, False, True]


def test_grade_batch_survives_a_worker_killed_mid_item(grader):
    grader.start()
    busy_pid = grader._workers[0].process.pid  # with all workers ready, the first one gets the item
    num_restarts = grader.num_restarts
    killer = threading.Timer(0.5, os.kill, (busy_pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    assert grader.grade_batch([HANGS], ["5"], timeout=SAFE_TIMEOUT) == [None]
    assert time.monotonic() - start < 5.0  # noticed by the pipe closing, not by the deadline
    killer.join()
    assert grader.num_restarts == num_restarts + 1
    assert grader.grade_batch([r"\boxed{2}"], ["2"], timeout=SAFE_TIMEOUT) == [True]


def test_grade_batch_replaces_a_worker_that_died_while_idle(grader):
    grader.start()
    num_restarts = grader.num_restarts
    for worker in grader._workers:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join()
    assert grader.grade_batch([r"\boxed{2}", r"\boxed{3}"], ["2", "2"], timeout=SAFE_TIMEOUT) == [True, False]
    assert grader.num_restarts == num_restarts + 2  # found dead when handed an item, and replaced


def test_grading_works_off_the_main_thread():
    # math-verify's own signal.alarm limit raises ValueError outside the main thread; the pool has none
    results = []
    thread = threading.Thread(target=lambda: results.append(grade(r"\boxed{2}", "2", timeout=SAFE_TIMEOUT)))
    thread.start()
    thread.join()
    assert results == [True]


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _still_running(pids: list[int], grace_s: float = 5.0) -> list[int]:
    """The pids that still run after up to `grace_s`: a worker killed as its parent exits (SIGKILL on the parent's
    death) dies a moment later, which a busy machine can stretch past the parent's own exit."""
    deadline = time.monotonic() + grace_s
    while (running := [p for p in pids if _is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_interpreter_exit_stops_workers_even_mid_grade():
    script = textwrap.dedent(f"""
        import threading, time
        from winnow.oracles.math import MathGrader
        if __name__ == "__main__":
            pool = MathGrader(num_workers=2, timeout=60)  # never closed
            pool.start()
            print(*[w.process.pid for w in pool._workers], flush=True)
            threading.Thread(target=pool.grade_batch, args=([{HANGS!r}], ["5"]), daemon=True).start()
            time.sleep(0.5)
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 30  # not the 60 s the hanging grade was allowed
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2 and _still_running(pids) == []


def test_closed_grader_stops_its_workers_and_refuses_work():
    with MathGrader(num_workers=1) as pool:
        assert pool.grade_batch([r"\boxed{1}"], ["1"], timeout=SAFE_TIMEOUT) == [True]
        process = pool._workers[0].process
    assert not process.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade_batch([r"\boxed{1}"], ["1"])
    pool.close()  # idempotent


def test_math_reward_scores_and_marks_ungraded_as_none(grader):
    reward = MathReward(grader)  # its timeout is the pool's, 1 s
    assert reward([""] * 3, [r"\boxed{2}", r"\boxed{3}", HANGS], reference=["2", "2", "5"]) == [1.0, 0.0, None]
    with pytest.raises(MissingReferenceError, match="--data.answer-column"):
        math_reward([""], [r"\boxed{2}"], reference=[None])


def test_exact_match_normalizes_whitespace_only():
    completions = [" 46\n", "4 6", "46.", "46", "a \t b\n c"]
    reference = ["46", "46", "46", "46", "a b c"]
    assert exact_match_reward([""] * 5, completions, reference) == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_exact_match_without_reference_says_which_column_to_set():
    with pytest.raises(ValueError, match=r"'exact'.*1 of 2 prompts.*--data.answer-column"):
        exact_match_reward(["", ""], ["1", "2"], ["1", None])


def test_boxed_format_reward():
    completions = [r"\boxed{1}", "no box", r"\boxed{1} and \boxed{", r"\boxed{ }", r"\fbox{x}"]
    assert boxed_format_reward([""] * 5, completions, reference=[None] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


# --------------------------------------------------------------------------- FunctionOracle


def constant(values):
    return lambda prompts, completions, reference, **columns: list(values)


def test_weighted_sum_and_components():
    oracle = FunctionOracle([("a", constant([1.0, 0.0, 1.0]), 1.0), ("b", constant([0.2, 0.4, 0.6]), -0.5)])
    result = oracle.reward(["p"] * 3, ["c"] * 3, ["r"] * 3)
    # 1 - 0.5*0.2 = 0.9;  0 - 0.5*0.4 = -0.2;  1 - 0.5*0.6 = 0.7
    assert result.scores == pytest.approx([0.9, -0.2, 0.7])
    assert result.components == {"a": [1.0, 0.0, 1.0], "b": [0.2, 0.4, 0.6]}
    assert set(result.metrics) == {"oracle/latency_s", "oracle/a/latency_s", "oracle/b/latency_s",
                                   "oracle/num_failed", "oracle/num_retries"}
    assert result.metrics["oracle/num_failed"] == 0.0 and result.metrics["oracle/num_retries"] == 0.0


def test_functions_get_reference_and_columns_by_name():
    def by_difficulty(prompts, completions, reference, difficulty, **columns):
        return [float(c == r) * d for c, r, d in zip(completions, reference, difficulty)]

    oracle = FunctionOracle([("d", by_difficulty, 1.0)])
    result = oracle.reward(["p", "p"], ["x", "y"], ["x", "x"], columns={"difficulty": [3, 5]})
    assert result.scores == [3.0, 0.0]


def test_user_function_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length_bonus(prompts, completions, **columns):\n"
                    "    return [len(c) / 10 for c in completions]\n")
    name, fn = load_reward_function(f"{path}:length_bonus")
    assert name == "length_bonus"
    assert FunctionOracle([(name, fn, 2.0)]).reward(["p", "p"], ["abc", "abcde"], [None, None]).scores == [0.6, 1.0]


def test_user_function_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "winnow_test_rewards_mod.py").write_text("def one(prompts, completions, **kw):\n"
                                                         "    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = load_reward_function("winnow_test_rewards_mod:one")
    assert name == "one" and fn([""], ["x"], reference=[None]) == [1.0]


def test_a_failing_function_is_retried_with_backoff():
    calls = []

    def flaky(prompts, completions, **columns):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionError("judge busy")
        return [1.0] * len(completions)

    result = FunctionOracle([("flaky", flaky, 1.0)], max_retries=2, retry_backoff=0.05).reward(["p"], ["c"], [None])
    assert result.scores == [1.0]
    assert result.metrics["oracle/num_retries"] == 2.0
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # backoff doubles


def test_a_function_that_always_raises_leaves_its_completions_unscored(caplog):
    def broken(prompts, completions, **columns):
        raise RuntimeError("boom")

    oracle = FunctionOracle([("ok", constant([1.0, 1.0]), 1.0), ("broken", broken, 1.0)], max_retries=1,
                            retry_backoff=0.0)
    with caplog.at_level(logging.ERROR, logger="winnow.oracles.functions"):
        result = oracle.reward(["p"] * 2, ["c"] * 2, [None] * 2)
    assert result.scores == [None, None] and result.num_failed == 2
    assert result.components == {"ok": [1.0, 1.0], "broken": [None, None]}
    assert result.metrics["oracle/num_failed"] == 2.0 and result.metrics["oracle/num_retries"] == 1.0
    assert any("'broken' failed 2 times" in r.getMessage() for r in caplog.records)


def test_none_scores_are_retried_once():
    calls = []

    def sometimes(prompts, completions, **columns):
        calls.append(list(completions))
        return [None if c == "never" or (c == "later" and len(calls) == 1) else 1.0 for c in completions]

    result = FunctionOracle([("s", sometimes, 0.5)]).reward(["p"] * 3, ["ok", "later", "never"], [None] * 3)
    assert calls == [["ok", "later", "never"], ["later", "never"]]  # the unscored ones, in one call
    assert result.scores == [0.5, 0.5, None]
    assert result.metrics["oracle/num_retries"] == 2.0 and result.metrics["oracle/num_failed"] == 1.0


def test_a_hanging_math_answer_is_unscored_after_one_more_try(grader):
    oracle = FunctionOracle([("math", MathReward(grader), 1.0)])
    result = oracle.reward(["p"] * 2, [r"\boxed{2}", HANGS], ["2", "5"])
    assert result.scores == [1.0, None]
    assert result.metrics["oracle/num_retries"] == 1.0 and result.metrics["oracle/num_failed"] == 1.0


def test_close_closes_the_functions_that_hold_resources():
    class Pooled:
        is_closed = False

        def __call__(self, prompts, completions, **columns):
            return [1.0] * len(completions)

        def close(self):
            self.is_closed = True

    pooled = Pooled()
    FunctionOracle([("plain", constant([1.0]), 1.0), ("pooled", pooled, 1.0)]).close()
    assert pooled.is_closed


@pytest.mark.parametrize("out, message", [
    ([1.0], r"'bad' returned 1 scores for 2 completions"),
    ([1.0, "yes"], r"'bad' returned 'yes' \(str\) for completion 1"),
    ([1.0, float("nan")], r"'bad' returned nan"),
    (1.0, r"'bad' returned a float"),
])
def test_contract_breaks_raise_naming_the_function(out, message):
    with pytest.raises(RewardFunctionError, match=message):
        FunctionOracle([("bad", lambda prompts, completions, **columns: out, 1.0)]).reward(["p"] * 2, ["c"] * 2,
                                                                                          [None] * 2)


def test_wrong_signature_and_missing_reference_raise_at_once():
    with pytest.raises(RewardFunctionError, match=r"'two_args' cannot take winnow's arguments"):
        FunctionOracle([("two_args", lambda prompts, completions: [1.0], 1.0)]).reward(["p"], ["c"], ["r"])
    with pytest.raises(MissingReferenceError):  # a configuration error: not retried into None scores
        FunctionOracle([("exact", exact_match_reward, 1.0)]).reward(["p"], ["c"], [None])


@pytest.mark.parametrize("spec, message", [
    ("bogus", r"unknown reward 'bogus'.*math, exact, boxed_format"),
    ("no_such_module_xyz:fn", r"no module named 'no_such_module_xyz'.*PYTHONPATH"),
    ("winnow.oracles.rules:nope", r"has no 'nope'; functions defined there: .*exact_match_reward"),
    ("winnow.oracles.functions:BUILTIN_REWARDS", r"'BUILTIN_REWARDS' is a tuple, not a function"),
    ("missing/rewards.py:fn", r"no file 'missing/rewards.py'"),
    ("rewards.py", r"names a file but not the function in it: use 'rewards.py:function'"),
])
def test_bad_specs_say_what_to_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


def test_oracle_config_checks_weights():
    with pytest.raises(ValueError, match="1 reward_weights for 2 rewards"):
        OracleConfig(rule=RuleOracleConfig(rewards=["exact", "boxed_format"], reward_weights=[1.0]))


def test_make_oracle_end_to_end():
    config = OracleConfig(rule=RuleOracleConfig(rewards=["math", "boxed_format"], reward_weights=[1.0, 0.1],
                                                math_num_workers=1, math_timeout_s=SAFE_TIMEOUT))
    oracle = make_oracle(config)
    try:
        result = oracle.reward(["p"] * 3, [r"\boxed{\frac{1}{2}}", "0.5", r"\boxed{1}"], ["0.5"] * 3)
    finally:
        oracle.close()
    # math + 0.1 * boxed: 1 + 0.1 = 1.1;  1 + 0 (right, unboxed) = 1.0;  0 + 0.1 = 0.1
    assert result.scores == pytest.approx([1.1, 1.0, 0.1])
    assert result.components == {"math": [1.0, 1.0, 0.0], "boxed_format": [1.0, 0.0, 1.0]}
