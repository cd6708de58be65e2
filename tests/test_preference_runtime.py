"""The preference loop's pieces: labelling pairs, picking pairs, training on whole pairs, the win rate, offline data."""
from __future__ import annotations

import copy

import pytest
import torch

from winnow.algorithms import DPO
from winnow.eval.win_rate import evaluate_win_rate, reference_responses
from winnow.exploration import BestVsWorst, Candidate, Judge, RandomPairs, to_pairs
from winnow.learner.batch import make_pair_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.loops.config import RolloutConfig
from winnow.loops.offline import dataset_pairs
from winnow.loops.preference import train_pairs
from winnow.oracles import OracleConfig, RuleOracleConfig, make_preference_oracle
from winnow.recipes.preference import PreferenceTrainConfig
from winnow.types import Completion, PreferencePair, Prompt, PreferenceResult


def _completion(text: str, tokenizer=None, prompt_ids=(3,)) -> Completion:
    ids = [] if tokenizer is None else tokenizer(text, add_special_tokens=False)["input_ids"]
    return Completion(list(prompt_ids), ids, [0.0] * len(ids), "stop", text)


def test_to_pairs_labels_by_probability_and_skips_ties_and_failures():
    p = Prompt("1+1=", [3], reference="2")
    a, b = _completion("2"), _completion("3")
    pairs, metrics = to_pairs([Candidate(p, a, b, 0.8), Candidate(p, a, b, 0.1), Candidate(p, a, b, 0.5),
                               Candidate(p, a, b, None)])
    assert [(x.chosen.text, x.rejected.text) for x in pairs] == [("2", "3"), ("3", "2")]
    assert [x.probability for x in pairs] == pytest.approx([0.8, 0.9])
    # margin = mean |2p - 1| over labelled pairs = (0.6 + 0.8) / 2
    assert metrics == {"pref/pairs": 2.0, "pref/tied": 1.0, "pref/unjudged": 1.0, "pref/model_labelled": 0.0,
                       "pref/mean_margin": pytest.approx(0.7)}


def test_best_vs_worst_pairs_the_extremes_and_random_pairs_compare_once():
    oracle = make_preference_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["closeness"])))
    prompts = [Prompt("12+34=", [3], reference="46"), Prompt("1+1=", [3], reference="2")]
    groups = [[_completion(t) for t in ("47", "46", "x", "40")], [_completion(t) for t in ("3", "3")]]
    judge = Judge(oracle)
    candidates = BestVsWorst().select(prompts, groups, judge)
    assert judge.num_queries == 6
    # best "46" (0) vs worst "x" (-10): sigma(10); the second group's scores are equal: a tie, exactly 0.5
    assert (candidates[0].a.text, candidates[0].b.text) == ("46", "x")
    assert candidates[0].probability == pytest.approx(1 / (1 + torch.exp(torch.tensor(-10.0)).item()))
    assert candidates[1].probability == 0.5
    judge = Judge(oracle)
    candidates = RandomPairs(seed=0).select(prompts, groups, judge)
    assert judge.num_queries == 2 and all(c.a.text != c.b.text for c in candidates[:1])


def test_best_vs_worst_needs_an_oracle_with_scores():
    class CompareOnly:
        def compare(self, prompts, a, b, references=None, columns=None):
            return PreferenceResult([0.5] * len(prompts))

        def close(self):
            pass

    with pytest.raises(ValueError, match="--pairs.selection random"):
        BestVsWorst().select([Prompt("q", [3])], [[_completion("a"), _completion("b")]], Judge(CompareOnly()))


def test_training_on_pairs_does_not_depend_on_the_micro_batch_size(tiny_tokenizer, tiny_model):
    """Micro-batches of 2 rows (one pair) and of 8 rows give the same loss: pairs are never split and the
    normaliser is the mini-batch's number of pairs."""
    prompt_ids = tiny_tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    pairs = [PreferencePair(Prompt("12+34=", prompt_ids), _completion(c, tiny_tokenizer, prompt_ids),
                            _completion(r, tiny_tokenizer, prompt_ids))
             for c, r in [("46", "47"), ("4", "999"), ("46", "4"), ("1", "22")]]
    batch = make_pair_batch(pairs, tiny_tokenizer.pad_token_id)
    assert batch.batch_size == 8 and batch.rewards.tolist() == [1.0] * 8
    losses = []
    for micro in (2, 8):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, LearnerConfig(lr=1e-3, micro_batch_size=micro), 10, copy.deepcopy(model))
        losses.append(train_pairs(learner, batch, DPO(beta=0.1))["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)  # the policy is the reference: Delta = 0, log 2
    with pytest.raises(ValueError, match="odd"):
        learner.config.micro_batch_size = 3
        train_pairs(learner, batch, DPO())


def test_win_rate_counts_ties_as_half(tiny_tokenizer, tiny_model):
    from winnow.engines.hf import HFEngine

    engine = HFEngine(tiny_model, tiny_tokenizer, device="cpu")
    prompts = [Prompt(q, tiny_tokenizer(q, add_special_tokens=False)["input_ids"], reference=a,
                      columns={"reference_response": r}) for q, a, r in [("1+1=", "2", "3"), ("2+2=", "4", "5")]]
    greedy = [c.text for c in engine.generate([p.token_ids for p in prompts], _greedy())]
    oracle = make_preference_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["closeness"])))
    # Against its own greedy answers every comparison is a tie (equal rule scores): each counts 0.5.
    result = evaluate_win_rate(engine, oracle, prompts, greedy, max_tokens=4)
    assert result.metrics["eval/win_rate"] == 0.5 and result.metrics["eval/tie_rate"] == 1.0
    # Against the exact sums an untrained model (its answers are not the sums) loses every comparison.
    assert all(g != p.reference for g, p in zip(greedy, prompts))
    result = evaluate_win_rate(engine, oracle, prompts, [p.reference for p in prompts], max_tokens=4)
    assert result.metrics["eval/win_rate"] == 0.0 and result.metrics["eval/win_rate_unjudged"] == 0
    assert result.samples[0]["reference_response"] == "2"
    assert reference_responses(prompts, "reference_response") == ["3", "5"]
    with pytest.raises(ValueError, match="--eval.reference-column"):
        reference_responses(prompts, "missing")


def _greedy():
    from winnow.types import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=4)


def test_offline_rows_must_have_chosen_and_rejected(tiny_tokenizer):
    ok = Prompt("1+1=", [3], columns={"chosen": "2", "rejected": "3"}, index=0)
    pairs = dataset_pairs([ok], tiny_tokenizer, "pairs.jsonl")
    assert pairs[0].chosen.response_ids[-1] == tiny_tokenizer.eos_token_id and pairs[0].rejected.text == "3"
    bad = Prompt("1+1=", [3], columns={"chosen": "2"}, index=7)
    with pytest.raises(ValueError, match=r"pairs.jsonl, row 7: 'rejected' must be a non-empty string"):
        dataset_pairs([bad], tiny_tokenizer, "pairs.jsonl")


def test_preference_config_checks():
    with pytest.raises(ValueError, match="at least 2 responses"):
        PreferenceTrainConfig(algo=DPO(), rollout=RolloutConfig(num_samples=1))
    with pytest.raises(ValueError, match="must be even"):
        PreferenceTrainConfig(algo=DPO(), learner=LearnerConfig(micro_batch_size=5))
    with pytest.raises(ValueError, match="kind='banana' must be one of rule, remote, reward_model, judge"):
        OracleConfig(kind="banana")


def test_closeness_rule_by_hand():
    from winnow.oracles.rules import closeness_reward

    # sum 46: exact 0, off by 1 -1, off by 14 capped at -10, negative numbers parse, prose and "4-6" are -10
    out = closeness_reward(["12+34="] * 6, ["46", " 47 ", "60", "-4", "forty-six", "4-6"], reference=["46"] * 6)
    assert out == [0.0, -1.0, -10.0, -10.0, -10.0, -10.0]
    assert closeness_reward(["5-9="], ["-3"], reference=["-4"]) == [-1.0]


def test_the_builtin_preference_task_carries_reference_responses(tiny_tokenizer):
    from winnow.data import DataConfig, load_prompts

    prompts = load_prompts(DataConfig(train="arithmetic-pref", max_eval_prompts=5), tiny_tokenizer, "eval")
    assert len(prompts) == 5
    for p in prompts:
        a, b = p.text.removesuffix("=").split("+")
        assert p.reference == str(int(a) + int(b))
        assert p.columns["reference_response"] == str(int(a) + int(b) + 1)  # off by one: only the sum beats it
