"""Environments: the built-in game's rules, the Python tool's limits, the GEM adapter on real GEM environments, and
the `--env` loader's errors. No model here (tests/test_multiturn.py runs episodes)."""
from __future__ import annotations

import time

import pytest

from winnow.envs import EnvUnavailableError, check_same_start, make_env_factory
from winnow.envs.guess_number import GuessNumberEnv, bisection_action, scripted_conversations
from winnow.envs.python_tool import PythonTool, PythonToolConfig, ToolEnv, run_python


def test_guess_number_rules_and_rewards():
    env = GuessNumberEnv(high=9, max_turns=3)
    observation, info = env.reset(seed=7)
    target = info["target"]
    assert observation == "1-9:" and 1 <= target <= 9
    assert env.reset(seed=7)[1]["target"] == target  # the seed fixes the hidden number
    # a wrong guess narrows the interval and costs 0.1; the right one pays 1 and ends the episode
    low_guess = 1 if target > 1 else 2
    observation, reward, terminated, truncated, _ = env.step(str(low_guess))
    expected = f"{low_guess + 1}-9:" if low_guess < target else f"1-{low_guess - 1}:"
    assert (observation, reward, terminated, truncated) == (expected, -0.1, False, False)
    assert env.step(str(target))[1:4] == (1.0, True, False)
    # not a number: the episode ends at -1
    env.reset(seed=7)
    assert env.step("five")[1:4] == (-1.0, True, False)


def test_guess_number_out_of_guesses_is_termination_and_bisection_solves_seven_of_nine():
    solved = 0
    for seed in range(200):
        env = GuessNumberEnv(high=9, max_turns=3)
        observation, info = env.reset(seed=seed)
        rewards = []
        for _ in range(3):
            observation, reward, terminated, truncated, step_info = env.step(bisection_action(observation))
            rewards.append(reward)
            assert not truncated  # running out of guesses is the game's own end
            if terminated:
                break
        assert terminated
        solved += step_info["success"]
        # bisection misses exactly the numbers 1+2+4 guesses cannot reach in 1..9: 4 and 9 (guesses 5, 2|7, 1|3|6|8)
        assert step_info["success"] == (info["target"] not in (4, 9))
    assert 0.6 < solved / 200 < 0.95


def test_scripted_conversations_play_inside_the_interval():
    conversations = scripted_conversations(50, seed=1)
    for messages in conversations:
        for user, assistant in zip(messages[::2], messages[1::2]):
            low, top = (int(x) for x in user["content"].rstrip(":").split("-"))
            assert low <= int(assistant["content"]) <= top
    assert scripted_conversations(5, seed=1) == conversations[:5]  # seeded


def test_python_tool_runs_code_and_enforces_limits():
    tool = PythonTool(PythonToolConfig(timeout_s=2.0, memory_mb=256, max_output=50))
    assert tool.execute_action("no code here") == (False, False, "", "no code here")
    is_parsed, has_error, observation, code = tool.execute_action("try <python>print(6 * 7)</python>")
    assert (is_parsed, has_error, observation, code) == (True, False, "42\n", "print(6 * 7)")
    assert tool.execute_action("```python\nprint('fenced')\n```")[2] == "fenced\n"
    # errors come back as the observation
    _, has_error, observation, _ = PythonTool().execute_action("<python>x = 1\n1 / 0</python>")
    assert has_error and 'File "<code>", line 2' in observation and "ZeroDivisionError" in observation
    # time limit: killed at the limit, not after the loop
    start = time.perf_counter()
    observation, has_error = run_python("while True: pass", PythonToolConfig(timeout_s=1.0))
    assert has_error and observation == "timed out after 1 s" and time.perf_counter() - start < 5
    # memory limit: a 1 GiB allocation fails under 256 MiB
    observation, has_error = run_python("x = bytearray(1 << 30)\nprint('allocated')", PythonToolConfig(memory_mb=256))
    assert has_error and "MemoryError" in observation and "allocated" not in observation
    # no network
    observation, has_error = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))",
                                        PythonToolConfig())
    assert has_error and "network access is disabled" in observation
    # output cut
    observation, _ = run_python("print('a' * 500)", PythonToolConfig(max_output=50))
    assert observation.startswith("a" * 50) and "451 characters cut" in observation


def test_tool_env_wraps_any_env_in_gems_shape():
    env = ToolEnv(GuessNumberEnv(high=9, max_turns=3), [PythonTool()], max_tool_uses=1)
    observation, info = env.reset(seed=7)
    assert observation.startswith("1-9:\n") and "<python>" in observation
    # a tool call: the game does not step (no turn used), reward 0
    assert env.step("<python>print(2 + 3)</python>") == ("5\n", 0.0, False, False,
                                                        {"tool": "python", "tool_error": False, "tool_uses": 1})
    # past max_tool_uses the action goes to the game (it is not a number: the game ends the episode)
    assert env.step("<python>print(1)</python>")[1:3] == (-1.0, True)


def test_gem_adapter_runs_real_gem_environments():
    factory = make_env_factory("gem:game:GuessTheNumber-v0-easy")
    env = factory()
    observation, _ = env.reset(seed=3)
    assert "between 1 and 10" in observation
    assert check_same_start(factory, seed=3) == observation  # copies reset alike: a group starts from one state
    # GEM's own rewards pass through as GEM gives them: a miss is 0, a format error is GEM's -0.1
    observation, reward, terminated, truncated, _ = env.step("\\boxed{10}")
    assert reward == 0.0 and not terminated and "lower than 10" in observation
    assert env.step("no guess")[1:3] == (-0.1, True)
    rg = make_env_factory("gem:rg:letter_counting")()
    observation, _ = rg.reset(seed=1)
    assert observation.startswith("How many times does the letter")


def test_unavailable_environments_fail_with_a_clear_message():
    with pytest.raises(EnvUnavailableError, match="nltk data .*Resource words not found.*`python -m nltk.downloader words`"):
        make_env_factory("gem:game:Wordle-v0-easy")
    with pytest.raises(EnvUnavailableError, match="GEM has no environment 'game:GuessTheNumber-v0'.*-easy"):
        make_env_factory("gem:game:GuessTheNumber-v0")
    with pytest.raises(ValueError, match="not an environment; use guess-number, gem:ID"):
        make_env_factory("tictactoe")
    with pytest.raises(ValueError, match="unknown tool; tools are python"):
        make_env_factory("guess-number", ["calculator"])
    with pytest.raises(ValueError, match=r"guess-number\[:HIGH\[:MAX_TURNS\]\]"):
        make_env_factory("guess-number:nine")


def test_user_classes_load_by_module_or_file(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text("class Echo:\n"
                    "    def reset(self, seed=None):\n        return f'seed {seed}', {}\n"
                    "    def step(self, action):\n        return action, 1.0, True, False, {}\n"
                    "class NotAnEnv:\n    pass\n"
                    "class Drifting:\n    n = 0\n"
                    "    def reset(self, seed=None):\n        Drifting.n += 1\n        return str(Drifting.n), {}\n"
                    "    def step(self, action):\n        return '', 0.0, True, False, {}\n")
    env = make_env_factory(f"{path}:Echo")()
    assert env.reset(seed=4) == ("seed 4", {}) and env.step("hi") == ("hi", 1.0, True, False, {})
    assert make_env_factory("winnow.envs.guess_number:GuessNumberEnv")().reset(seed=1)[0] == "1-9:"
    with pytest.raises(ValueError, match="has no reset\\(seed\\) and step\\(action\\)"):
        make_env_factory(f"{path}:NotAnEnv")
    with pytest.raises(ValueError, match="reset with seed 0 start differently"):
        make_env_factory(f"{path}:Drifting")
    with pytest.raises(FileNotFoundError, match="no file"):
        make_env_factory(f"{tmp_path}/missing.py:Echo")
