"""Extending winnow: a new RL objective and a new pair selector each fit in one file plus one registry line
(the files are tests/examples/), and run through the real CLI."""
from __future__ import annotations

import pytest
import torch

from examples.length_selector import LengthSelector
from examples.reinforce_pp import ReinforcePP
from winnow.algorithms import OBJECTIVES
from winnow.exploration import SELECTORS, Candidate, Judge
from winnow.logging import read_metrics
from winnow.types import Completion, Group, PreferenceResult, Prompt


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from winnow.data import build_tiny_model, make_task, save_tiny, train_char_tokenizer

    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for q, a in task.examples("train")][:500])
    return str(save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("tiny")))


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "reinforce++", ReinforcePP)  # the one registry line of the objective
    monkeypatch.setitem(SELECTORS, "length", LengthSelector)  # ... and of the selector


def _completion(text: str) -> Completion:
    return Completion([3], [4] * len(text), [0.0] * len(text), "stop", text)


def test_batch_baseline_objective_by_hand():
    from winnow.learner.batch import make_train_batch

    # rewards [1, 0 | 0, 1 | 1, 1] in groups 0, 1, 2: batch mean 2/3, centred [1/3, -2/3, -2/3, 1/3, 1/3, 1/3],
    # population variance (4/9 + 8/9) / 6 = 2/9, std 0.4714045: A = [0.7071068, -1.4142136, ...]
    batch = make_train_batch([_completion("1")] * 6, None, torch.tensor([1.0, 0, 0, 1, 1, 1]),
                             group_index=torch.tensor([0, 0, 1, 1, 2, 2]))
    values = ReinforcePP().advantages(batch).values
    torch.testing.assert_close(values, torch.tensor([0.7071053, -1.4142106, -1.4142106, 0.7071053, 0.7071053,
                                                     0.7071053]), atol=1e-5, rtol=0)


def test_the_loop_keeps_groups_of_one_for_a_batch_baseline():
    from winnow.loops.config import RolloutConfig
    from winnow.loops.rl import RLFamily

    # A flat group [1, 1] and a lone sample carry signal against the batch; a group baseline drops the lone one.
    groups = [Group(Prompt("q", [3]), [_completion("a"), _completion("b")], [1.0, 1.0]),
              Group(Prompt("r", [3]), [_completion("c"), _completion("d")], [0.0, None])]
    for objective, trained in [(ReinforcePP(), 3.0), (OBJECTIVES["grpo"](), 2.0)]:
        # only the advantages phase runs: no engine, learner or oracle needed
        family = RLFamily(actor=None, learner=None, oracle=None, objective=objective, rollout=RolloutConfig(),
                          eval_config=None, prompts=iter([]), eval_prompts=[], seed=0, pad_token_id=0)
        batch, metrics = family.advantages(groups)
        assert metrics["rollout/trained_samples"] == trained
    torch.testing.assert_close(batch.advantages, torch.zeros(2))  # GRPO: the flat group has no signal


def test_stateful_selector_learns_from_observe():
    class ShorterWins:  # an oracle that prefers the shorter answer
        def compare(self, prompts, a, b, references=None, columns=None):
            return PreferenceResult([0.9 if len(x) < len(y) else 0.1 for x, y in zip(a, b)])

    selector, prompts = LengthSelector(), [Prompt("q", [3])]
    groups = [[_completion(t) for t in ("1234", "1", "12", "123456")]]
    for _ in range(3):  # unsure: the shortest against the longest
        candidates = selector.select(prompts, groups, Judge(ShorterWins()))
        assert (candidates[0].a.text, candidates[0].b.text) == ("1", "123456")
        metrics = selector.observe(candidates)
    assert metrics["explore/shorter_win_rate"] == pytest.approx(4 / 5)
    selector.observe(candidates)  # 5 / 6 > 0.8: confident, so it compares the two shortest
    assert [(c.a.text, c.b.text) for c in selector.select(prompts, groups, Judge(ShorterWins()))] == [("1", "12")]


def test_both_run_through_the_cli(registered, tiny_model_dir, tmp_path):
    from winnow.cli import main

    common = ["--model.path", tiny_model_dir, "--rollout.prompts-per-iteration", "4", "--rollout.max-tokens", "4",
              "--num-iterations", "2", "--eval.max-prompts", "4", "--device", "cpu", "--output-dir", str(tmp_path),
              "--logging.no-progress"]
    main(["train", "reinforce++", "--rollout.num-samples", "1", "--run-name", "rpp", *common])
    last = read_metrics(tmp_path / "rpp")[-1]
    # one sample per prompt: a group baseline would train nothing, the batch baseline trains every sample
    assert last["counts/optimizer_steps"] == 2 and last["rollout/trained_samples"] == 4
    # the untrained model never answers right, so exact match would tie every pair and train nothing (an
    # error): a reward that tells responses apart
    (tmp_path / "rewards.py").write_text("def reward(prompts, completions, **columns):\n"
                                         "    return [float(sum(map(ord, c)) % 3) for c in completions]\n")
    main(["train", "dpo", "--pairs.selection", "length", "--rollout.num-samples", "4", "--run-name", "len",
          "--learner.micro-batch-size", "8", "--oracle.rewards", f"{tmp_path / 'rewards.py'}:reward", *common])
    rows = read_metrics(tmp_path / "len")
    assert "explore/shorter_win_rate" in rows[-1] and rows[-1]["counts/oracle_queries"] == 2 * 4
