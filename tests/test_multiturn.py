"""Multi-turn episodes: the runner's conversation and mask token by token (plain text and chat template, the built-in
game and a real GEM environment), environments that raise or hang (counted, dropped, the run goes on), truncation,
the batch's advantages by hand (GRPO on returns; PPO's GAE across turns over the policy's tokens)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from winnow.algorithms import GRPO, PPO
from winnow.data.chat import add_chat_template
from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
from winnow.engines.hf import HFEngine
from winnow.envs import make_env_factory
from winnow.learner.batch import make_episode_batch
from winnow.loops.config import RolloutConfig
from winnow.loops.episodes import EpisodeConfig, EpisodeRunner
from winnow.loops.multiturn import MultiTurnFamily
from winnow.loops.seam import LocalActor
from winnow.types import Episode, SamplingParams

REPO = Path(__file__).resolve().parent.parent

FLAKY_ENV = '''
import time

class Flaky:
    """Rewards an action by its first digit; seeds 1, 5, 9, ... raise on their step, seeds 2, 6, 10, ... hang past
    the step timeout."""

    def reset(self, seed=None):
        self.seed = seed
        return "0=", {}

    def step(self, action):
        if self.seed % 4 == 1:
            raise RuntimeError("the environment broke")
        if self.seed % 4 == 2:
            time.sleep(2.5)
        digits = [c for c in action if c.isdigit()]
        return "", float(digits[0]) / 9 if digits else 0.0, True, False, {}
'''


def _runner(env: str, tokenizer, model, **config) -> EpisodeRunner:
    actor = LocalActor(HFEngine(copy.deepcopy(model), tokenizer, device="cpu"))
    return EpisodeRunner(make_env_factory(env), actor, tokenizer, EpisodeConfig(**config))


def _segments(e: Episode) -> list[tuple[int, list[int]]]:
    """The episode's tokens as (mask value, run of ids)."""
    runs: list[tuple[int, list[int]]] = []
    for token, m in zip(e.token_ids, e.policy_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(token)
        else:
            runs.append((m, [token]))
    return runs


def test_plain_episodes_are_observations_then_actions_token_by_token(tiny_tokenizer):
    # A random tiny model on the built-in game: each one-token answer is a digit (a guess) or a symbol (invalid).
    tokenizer = train_char_tokenizer(["0123456789-:=x?"])
    model = build_tiny_model(tokenizer, seed=1)
    runner = _runner("guess-number", tokenizer, model, max_turns=3, max_tokens=64)
    episodes, stats = runner.run([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=1, n=2), sample_seed=3)
    assert stats.num_errors == 0 and len(episodes) == 6
    assert [e.seed for e in episodes] == [5, 5, 6, 6, 7, 7]  # n copies per seed, in order: the groups
    for e in episodes:
        # observation, then (action, observation) per turn but the last: the mask alternates 0, 1, 0, 1, ...
        runs = _segments(e)
        assert [m for m, _ in runs] == [0, 1] * e.num_turns
        assert [tokenizer.decode(ids) for m, ids in runs if m == 0] == e.observations[: e.num_turns]
        assert [tokenizer.decode(ids, skip_special_tokens=True) for m, ids in runs if m == 1] == e.actions
        assert e.turn_ends == [i for i in range(len(e.token_ids)) if e.policy_mask[i] and (
            i + 1 == len(e.token_ids) or not e.policy_mask[i + 1])]
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.policy_mask) if not m)
        assert all(lp < 0.0 for lp, m in zip(e.logprobs, e.policy_mask) if m)
        # rewards as the game gives them, replayed on a fresh copy
        env = make_env_factory("guess-number")()
        env.reset(seed=e.seed)
        assert [env.step(a)[1] for a in e.actions] == e.turn_rewards
        assert e.terminated and not e.truncated
    # the same seeds replay the same episodes
    again, _ = runner.run([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=1, n=2), sample_seed=3)
    assert [e.token_ids for e in again] == [e.token_ids for e in episodes]
    runner.close()


def test_chat_episodes_render_as_the_chat_template_does():
    tokenizer = add_chat_template(train_char_tokenizer(["0123456789-:=x?"]))
    model = build_tiny_model(tokenizer, seed=2)
    # a random model seldom says EOS; +2.5 on its logit makes most answers end their turn within 4 tokens
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([tokenizer.eos_token_id]), torch.full((*out.shape[:-1], 1), 2.5)))
    runner = _runner("guess-number", tokenizer, model, max_turns=3, max_tokens=96, format="chat")
    episodes, _ = runner.run(list(range(8)), SamplingParams(temperature=1.0, max_tokens=4, n=2), sample_seed=0)
    num_exact = 0
    for e in episodes:
        runs = _segments(e)
        assert tokenizer.decode(runs[0][1]) == f"<|user|>{e.observations[0]}<|assistant|>"
        assert [m for m, _ in runs] == [0, 1] * e.num_turns
        special = set(tokenizer.all_special_ids)
        closed = all(e.token_ids[end] == tokenizer.eos_token_id for end in e.turn_ends)
        plain = not any(t in special for i, (t, m) in enumerate(zip(e.token_ids, e.policy_mask))
                        if m and i not in e.turn_ends)
        if closed and plain:
            # every answer is text closed by EOS: the tokens are exactly the template's rendering (an answer with a
            # sampled special token, <pad> say, keeps it in the ids, while the text and so the template drop it)
            messages = [m for o, a in zip(e.observations, e.actions)
                        for m in ({"role": "user", "content": o}, {"role": "assistant", "content": a})]
            assert e.token_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            num_exact += 1
    assert num_exact >= 4 and any(e.num_turns > 1 for e in episodes)
    runner.close()


def test_gem_episodes_carry_gems_rewards(tmp_path):
    tokenizer = train_char_tokenizer(["x"], include_all_bytes=True)
    model = build_tiny_model(tokenizer, seed=0, max_position_embeddings=1024)
    runner = _runner("gem:game:GuessTheNumber-v0-easy", tokenizer, model, max_turns=4, max_tokens=1024)
    episodes, stats = runner.run([11, 12], SamplingParams(temperature=1.0, max_tokens=4, n=2), sample_seed=1)
    assert stats.num_errors == 0
    assert episodes[0].observations[0] == episodes[1].observations[0]  # a group starts from one state
    for e in episodes:
        assert tokenizer.decode([t for t, m in zip(e.token_ids, e.policy_mask) if not m]) == "".join(
            e.observations[: e.num_turns])
        env = make_env_factory("gem:game:GuessTheNumber-v0-easy")()
        assert env.reset(seed=e.seed)[0] == e.observations[0]
        replay = [env.step(a) for a in e.actions]
        assert [r[1] for r in replay] == e.turn_rewards  # a random model's junk: GEM's format-error reward, -0.1
        assert e.turn_rewards[-1] == -0.1 and e.terminated
    runner.close()


def test_truncation_by_turn_limit_and_token_budget_is_counted_and_kept_or_dropped(tiny_tokenizer):
    tokenizer = train_char_tokenizer(["0123456789-:=x?"])
    model = build_tiny_model(tokenizer, seed=1)
    # 1..9 in 8 turns, but the runner allows 1: every episode not solved at once is truncated, not failed
    runner = _runner("guess-number:9:8", tokenizer, model, max_turns=1, max_tokens=64)
    episodes, _ = runner.run(list(range(8)), SamplingParams(temperature=1.0, max_tokens=1, n=2), sample_seed=0)
    truncated = [e for e in episodes if e.truncated]
    assert truncated and all(e.num_turns == 1 and not e.terminated for e in truncated)
    assert all(e.terminated for e in episodes if not e.truncated)
    # a budget of 8 tokens: "1-9:" (4) + one answer (1) + "a-b:" (4) reaches it after the first turn
    budget = _runner("guess-number:9:8", tokenizer, model, max_turns=5, max_tokens=8)
    episodes_b, _ = budget.run(list(range(8)), SamplingParams(temperature=1.0, max_tokens=1, n=1), sample_seed=0)
    assert all(e.truncated or e.terminated for e in episodes_b)
    assert all(len(e.token_ids) <= 9 and e.num_turns == 1 for e in episodes_b)
    # keep trains on them with the return they reached; drop leaves them out of their groups
    for mode, expected in (("keep", len(episodes)), ("drop", len(episodes) - len(truncated))):
        family = MultiTurnFamily(actor=runner.actor, learner=None, objective=GRPO(), rollout=RolloutConfig(),
                                 runner=runner, num_eval_episodes=0, seed=0, pad_token_id=0, truncated=mode)
        assert sum(len(g) for g in family.groups(episodes)) == expected
    runner.close()
    budget.close()


def test_an_environment_that_raises_or_hangs_drops_its_episode_and_the_run_goes_on(tmp_path, tiny_tokenizer):
    from winnow.cli import main

    (tmp_path / "flaky.py").write_text(FLAKY_ENV)
    model = build_tiny_model(tiny_tokenizer, seed=0)
    runner = _runner(f"{tmp_path}/flaky.py:Flaky", tiny_tokenizer, model, max_turns=2, max_tokens=32,
                     step_timeout_s=1.0)
    episodes, stats = runner.run([0, 1, 2, 3], SamplingParams(temperature=1.0, max_tokens=2, n=2), sample_seed=0)
    assert [e is None for e in episodes] == [False, False, True, True, True, True, False, False]
    assert stats.num_errors == 4
    assert "RuntimeError: the environment broke" in stats.errors[0] and "timed out after 1 s" in stats.errors[-1]
    runner.close()
    # a run: every iteration loses the groups of its broken seeds, counts them, and trains on the others (hung
    # steps keep their worker threads busy until they return: enough workers that the next iteration has free ones)
    save_tiny(model, tiny_tokenizer, tmp_path / "model")
    main(["train", "grpo", "--model.path", str(tmp_path / "model"), "--env", f"{tmp_path}/flaky.py:Flaky",
          "--env-step-timeout-s", "1", "--env-workers", "32", "--env-max-turns", "1", "--env-eval-episodes", "0",
          "--rollout.prompts-per-iteration", "8", "--rollout.num-samples", "2", "--rollout.max-tokens", "2",
          "--num-iterations", "2", "--output-dir", str(tmp_path / "runs"), "--run-name", "flaky",
          "--no-save-final", "--logging.no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "flaky" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "env/errors" in r]
    assert len(trained) == 2 and all(r["train/loss"] == r["train/loss"] for r in trained)
    # the iteration seeds are fixed by the run's seed: 8 of these 16 hit a broken seed (2 episodes each)
    assert [r["env/errors"] for r in trained] == [8.0, 8.0]
    assert rows[-1]["counts/env_errors"] == 16
    assert all(r["rollout/trained_samples"] == 16 - r["env/errors"] for r in trained)


def test_cli_refuses_bad_env_flags(tmp_path, tiny_tokenizer, tiny_model, capsys):
    from winnow.cli import main

    save_tiny(tiny_model, tiny_tokenizer, tmp_path / "model")
    common = ["train", "grpo", "--model.path", str(tmp_path / "model"), "--output-dir", str(tmp_path)]
    for flags, message in (
        (["--env", "guess-number", "--env-max-tokens", "4096"], "--env-max-tokens 4096 is more than the model's "
                                                                "context of 128 positions"),
        (["--env", "guess-number", "--env-max-turns", "0"], "--env-max-turns 0 must be >= 1"),
        (["--env", "guess-number", "--env-format", "chat"], "--env-format chat needs a tokenizer with a chat template"),
        (["--env", "tictactoe"], "--env 'tictactoe': not an environment"),
        (["--env", "guess-number", "--data.train", "arithmetic-3digit"], "--data.* set, but --env runs take"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(common + flags)
        assert exit_info.value.code == 2
        assert f"winnow: error: {message}" in capsys.readouterr().err


def test_grpo_on_episodes_uses_returns_as_group_rewards_on_policy_tokens_only():
    # two episodes of one seed: returns 0.9 (-0.1 then +1) and -0.2 (-0.1, -0.1)
    a = Episode(token_ids=[5, 6, 7, 8, 9, 10], policy_mask=[0, 1, 1, 0, 1, 1], logprobs=[0, -1, -1, 0, -1, -1],
                turn_rewards=[-0.1, 1.0], turn_ends=[2, 5], seed=3)
    b = Episode(token_ids=[5, 6, 7, 8, 9, 11, 12], policy_mask=[0, 1, 0, 0, 1, 0, 1],
                logprobs=[0, -1, 0, 0, -1, 0, -1], turn_rewards=[-0.1, -0.1], turn_ends=[1, 6], seed=3)
    family = MultiTurnFamily(actor=None, learner=None, objective=GRPO(), rollout=RolloutConfig(), runner=None,
                             num_eval_episodes=0, seed=0, pad_token_id=0)
    batch, metrics = family.advantages_of(family.groups([a, b, None]))
    assert metrics["rollout/trained_samples"] == 2 and metrics["rollout/dropped_groups"] == 0
    assert batch.response_mask.tolist() == [[0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 1]]
    assert batch.rewards.tolist() == pytest.approx([0.9, -0.2])
    # mean 0.35, population std 0.55: advantages (0.9 - 0.35) / 0.55 = 1 and -1 (GRPO's epsilon aside)
    torch.testing.assert_close(batch.advantages, torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)
    assert batch.turn_rewards[0].tolist() == pytest.approx([0, 0, -0.1, 0, 0, 1.0, 0])
    assert batch.turn_rewards[1].tolist() == pytest.approx([0, -0.1, 0, 0, 0, 0, -0.1])


def test_ppo_gae_runs_across_turns_over_policy_tokens():
    # One episode: observation [0], turn 1 = tokens 1, 2 (reward 0.5 on 2), observation 3, turn 2 = tokens 4, 5
    # (reward 1 on 5). V = 0.2, 0.4 | 0.6, 0.8 on the policy tokens. gamma 1, lambda 0.5; the observation is a hole:
    #   t=5: delta = 1 - 0.8 = 0.2                          A5 = 0.2
    #   t=4: delta = 0 + 0.8 - 0.6 = 0.2                    A4 = 0.2 + 0.5*0.2   = 0.3
    #   t=2: delta = 0.5 + 0.6 (V at t=4, across the hole) - 0.4 = 0.7;  A2 = 0.7 + 0.5*0.3 = 0.85
    #   t=1: delta = 0 + 0.4 - 0.2 = 0.2                    A1 = 0.2 + 0.5*0.85  = 0.625
    e = Episode(token_ids=[3, 4, 5, 6, 7, 8], policy_mask=[0, 1, 1, 0, 1, 1], logprobs=[0, -1, -1, 0, -1, -1],
                turn_rewards=[0.5, 1.0], turn_ends=[2, 5], seed=0)
    batch = make_episode_batch([e])
    batch.old_values = torch.tensor([[0.0, 0.2, 0.4, 0.0, 0.6, 0.8]])
    batch.old_logprobs = batch.engine_logprobs.clone()
    advantages, returns, _ = PPO(lam=0.5, whiten_advantages=False).token_advantages(batch)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.625, 0.85, 0.0, 0.3, 0.2]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.825, 1.25, 0.0, 0.9, 1.0]]))
    # without per-turn rewards the return (1.5) would all sit on the last token: A2 would be 0.475, not 0.85
    batch.turn_rewards = None
    advantages, _, _ = PPO(lam=0.5, whiten_advantages=False).token_advantages(batch)
    assert advantages[0, 2].item() == pytest.approx(0.6 - 0.4 + 0.5 * (0.2 + 0.5 * 0.7))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "winnow.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
