"""Active exploration: SEA's ensemble loss and regulariser, each selection rule on a fixed reward tensor, mixed
learning's query accounting, XPO's loss and sign, APL's entropy direction, and a short SEA run whose reward
model must learn the built-in preference rule (all on CPU, seconds)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from winnow.algorithms.preference import DPO, XPO
from winnow.data import make_task
from winnow.exploration import (
    APL,
    SEABestArm,
    SEAConfig,
    SEAExploreExploit,
    SEAGreedy,
    SEAPassive,
    SEAUncertainty,
    Judge,
    make_selector,
    to_pairs,
)
from winnow.exploration.ensemble import EnsembleConfig, EnsembleRewardModel, ensemble_loss
from winnow.exploration.features import arithmetic_features
from winnow.oracles.functions import FunctionOracle
from winnow.oracles.preference import RewardPreferenceOracle
from winnow.oracles.rules import closeness_reward, exact_match_reward
from winnow.types import Completion, PreferenceResult, Prompt, TrainBatch


def _completion(text: str, logprob_sum: float = -1.0, prompt_ids=(1,)) -> Completion:
    return Completion(list(prompt_ids), [5, 6], [logprob_sum / 2, logprob_sum / 2], "stop", text)


class CountingOracle:
    """A preference oracle that prefers the text that sorts later and records every pair it is asked about."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    def compare(self, prompts, a, b, references=None, columns=None) -> PreferenceResult:
        self.asked += list(zip(prompts, a, b))
        return PreferenceResult([0.5 if x == y else float(x > y) for x, y in zip(a, b)])


# ---------------------------------------------------------------------- the ensemble's loss


def test_ensemble_loss_and_regulariser_match_hand_worked_values():
    model = EnsembleRewardModel(input_size=1, num_members=2, hidden_size=1)
    with torch.no_grad():
        for w in model.weights:
            w.fill_(1.0)
        model.weights[2][1].fill_(2.0)  # member 0: r(x) = x; member 1: r(x) = 2x (for x > 0)
        for b in model.biases:
            b.zero_()
        model.initial.zero_()           # theta0 = 0, so the regulariser is mean(theta^2)
    chosen, rejected = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    loss, metrics = ensemble_loss(model, chosen, rejected, reg_lambda=0.5, reg_scale=128 / 256)
    # margins: member 0: 2 - 1 = 1, member 1: 4 - 2 = 2.
    # fit = (-log sigmoid(1) - log sigmoid(2)) / 2 = (0.313262 + 0.126928) / 2 = 0.220095
    # reg = mean(theta^2) over 12 parameters: weights 1,1 | 1,1 | 1,2 and six zero biases = 9 / 12 = 0.75
    # loss = 0.220095 + 0.5 * (B / N_q = 0.5) * 0.75 = 0.220095 + 0.1875 = 0.407595
    assert metrics["sea/rm_loss"] == pytest.approx(0.220095, abs=1e-6)
    assert metrics["sea/rm_reg"] == pytest.approx(0.75)
    assert loss.item() == pytest.approx(0.407595, abs=1e-6)


def test_ensemble_initialisation_is_truncated_normal_with_its_fan_in_scale():
    model = EnsembleRewardModel(input_size=400, num_members=20, hidden_size=128, seed=3)
    w = model.weights[0]                               # [20, 400, 128], std 1 / (2 sqrt(400)) = 0.025
    assert w.abs().max() <= 2 * 0.025
    assert float(w.std()) == pytest.approx(0.025 * 0.88, rel=0.03)  # a +-2 sigma truncation keeps 0.88 of the std
    assert not torch.equal(w[0], w[1])                 # members differ only by their initialisation
    assert torch.equal(model.initial, model.flat_parameters())


# ---------------------------------------------------------------------- the selection rules


# Columns are 4 responses, rows 3 ensemble members; column means 3, 1, 1.167, 1.167.
REWARDS = torch.tensor([[3.0, 2.0, 0.0, 1.0],
                        [3.0, 0.0, 2.5, 1.5],
                        [3.0, 1.0, 1.0, 1.0]])


def _rule(cls, seed=0, **config):
    return cls(seed=seed, config=SEAConfig(**config), featurize=arithmetic_features)


def test_best_arm_pairs_the_sampled_best_with_the_most_uncertain_difference():
    # Every member's best is response 0. Var_e(R0 - Rj) (unbiased): j=1 diffs [1, 3, 2] -> 1.0;
    # j=2 diffs [3, 0.5, 2] -> 1.583; j=3 diffs [2, 1.5, 2] -> 0.083. So the pair is (0, 2).
    for seed in range(5):
        assert _rule(SEABestArm, seed).pick(REWARDS) == (0, 2)


def test_uncertainty_picks_the_pair_with_the_largest_difference_variance():
    # Var_e(R1 - R2): diffs [2, -2.5, 0] -> 5.083, larger than any other pair's (at most 1.583).
    assert _rule(SEAUncertainty).pick(REWARDS) == (1, 2)


def test_greedy_pairs_the_ensemble_means_best_and_worst():
    assert _rule(SEAGreedy).pick(REWARDS) == (0, 1)


def test_explore_exploit_takes_the_best_of_two_members_that_disagree():
    rewards = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [0.0, 3.0, 2.0]])  # bests: 0, 0, 1
    picks = {_rule(SEAExploreExploit, seed).pick(rewards) for seed in range(20)}
    assert picks == {(0, 1), (1, 0)}  # whichever member comes first, the second is the other best
    agreeing = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0]])
    assert _rule(SEAExploreExploit).pick(agreeing) == (0, 0)  # a clash: every member's best is response 0


def test_passive_pairs_are_random_and_distinct():
    picks = [_rule(SEAPassive, seed).pick(REWARDS) for seed in range(30)]
    assert all(i != j for i, j in picks) and len(set(picks)) > 3


def test_a_clash_takes_another_response_and_identical_texts_are_never_paired():
    selector = _rule(SEAExploreExploit, random_on_clash=False, ensemble=EnsembleConfig(num_members=2))
    prompt = Prompt("12+30=", [1])
    group = [_completion("42"), _completion("42"), _completion("41"), _completion("7")]
    oracle = CountingOracle()
    candidates = selector.select([prompt], [group], Judge(oracle))
    assert len(candidates) == 1 and candidates[0].a.text != candidates[0].b.text
    single = selector.select([prompt], [[_completion("42"), _completion("42")]], Judge(oracle))
    assert single == [] and selector.metrics["sea/single_text_prompts"] == 1.0
    assert len(oracle.asked) == 1


# ---------------------------------------------------------------------- mixed preference learning


def _arithmetic_batch(rng: random.Random, num_prompts: int, n: int = 6):
    prompts, groups = [], []
    for _ in range(num_prompts):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        prompts.append(Prompt(f"{a}+{b}=", [1], reference=str(a + b)))
        groups.append([_completion(str(a + b + rng.randint(-6, 6))) for _ in range(n)])
    return prompts, groups


def test_mixed_learning_never_asks_the_oracle_about_model_labelled_prompts():
    oracle = CountingOracle()
    config = SEAConfig(mixed=True, mixed_fraction=0.3, mixed_burn_in=1, shadow_queries=False,
                       ensemble=EnsembleConfig(num_members=4, hidden_size=16, batch_size=4))
    selector = SEABestArm(seed=0, config=config, featurize=arithmetic_features)
    rng = random.Random(0)
    judge = Judge(oracle)
    first = selector.select(*_arithmetic_batch(rng, 10), judge)   # iteration 1: burn-in, all to the oracle
    selector.observe(first)
    assert judge.num_queries == 10 and all(c.labelled_by == "oracle" for c in first)
    buffered = len(selector.reward_model.buffer)

    judge = Judge(oracle)
    oracle.asked.clear()
    second = selector.select(*_arithmetic_batch(rng, 10), judge)
    by_model = [c for c in second if c.labelled_by == "model"]
    assert len(by_model) == 3 and judge.num_queries == 7 and len(oracle.asked) == 7
    asked_prompts = {p for p, _, _ in oracle.asked}
    assert not asked_prompts & {c.prompt.text for c in by_model}
    pairs, metrics = to_pairs(second)
    assert metrics["pref/model_labelled"] == 3.0      # they train the policy ...
    logged = selector.observe(second)
    oracle_labelled = sum(c.labelled_by == "oracle" and c.probability not in (None, 0.5) for c in second)
    assert len(selector.reward_model.buffer) == buffered + oracle_labelled  # ... never the reward model
    assert logged["sea/model_labelled_fraction"] == pytest.approx(0.3)

    config.shadow_queries = True                       # the diagnostic: asked, but counted apart
    judge = Judge(oracle)
    third = selector.select(*_arithmetic_batch(rng, 10), judge)
    assert judge.num_queries == 7 and judge.num_shadow_queries == 3
    assert "sea/shadow_agreement" in selector.observe(third)


# ---------------------------------------------------------------------- XPO


def _pair_batch(alpha_rows):
    # One pair, 2 response tokens per row: chosen = the policy's sample, rejected = the reference's sample.
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    ref = torch.tensor([[0.0, -0.75, -0.75], [0.0, -0.75, -0.75]])  # reference: -1.5 for both responses
    return TrainBatch(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long),
                      response_mask=mask, advantages=torch.zeros(2), engine_logprobs=torch.zeros(2, 3),
                      ref_logprobs=ref, sampled_by_reference=torch.tensor(alpha_rows))


def test_xpo_loss_matches_hand_worked_values_and_pushes_down_the_reference_sample():
    logprobs = torch.tensor([[0.0, -0.5, -0.5], [0.0, -1.0, -1.0]], requires_grad=True)  # sums: -1 and -2
    batch = _pair_batch([0.0, 1.0])
    loss, _ = XPO(beta=0.1, alpha=0.5).loss(logprobs, batch, num_sequences=2, num_tokens=4)
    # Delta = (-1 - -2) - (-1.5 - -1.5) = 1; DPO = -log sigmoid(0.1) = 0.644397;
    # exploration = alpha * log pi(y_ref) = 0.5 * -2 = -1.0; total = -0.355603.
    assert float(loss) == pytest.approx(0.644397 - 1.0, abs=1e-6)
    loss.backward()
    xpo_grad = logprobs.grad.clone()
    logprobs.grad = None
    dpo, _ = DPO(beta=0.1).loss(logprobs, batch, num_sequences=2, num_tokens=4)
    dpo.backward()
    # The sign: the extra term's gradient is +alpha on each of the reference sample's tokens (descent lowers
    # log pi(y_ref)) and 0 on the policy's own sample.
    assert torch.allclose(xpo_grad - logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))


def test_xpo_refuses_pairs_without_a_reference_sample():
    batch = _pair_batch([0.0, 1.0])
    batch.sampled_by_reference = None
    with pytest.raises(ValueError, match="--pairs.selection xpo"):
        XPO().loss(torch.zeros(2, 3), batch, num_sequences=2, num_tokens=4)


# ---------------------------------------------------------------------- APL


def test_apl_keeps_the_highest_entropy_prompts_and_their_widest_pair():
    prompts = [Prompt(f"p{k}", [1]) for k in range(3)]
    sums = [-1.0, -5.0, -3.0]  # per-sample log-probabilities: prompt 1 is the most uncertain (entropy ~5)
    groups = [[_completion(f"{k}-{s}", sums[k]) for s in range(3)] for k in range(3)]
    reference = {"1-0": -5.0, "1-1": -4.0, "1-2": -7.0}  # implicit rewards 0.1 * (-5 - ref): 0, -0.1, 0.2

    def reference_logprobs(completions):
        return [reference.get(c.text, -1.0) for c in completions]

    oracle = CountingOracle()
    selector = make_selector("apl", config=__import__("winnow.exploration", fromlist=["APLConfig"]).APLConfig(
        keep_fraction=1 / 3, beta=0.1), reference_logprobs=reference_logprobs)
    assert isinstance(selector, APL)
    candidates = selector.select(prompts, groups, Judge(oracle))
    assert [c.prompt.text for c in candidates] == ["p1"]
    assert (candidates[0].a.text, candidates[0].b.text) == ("1-2", "1-1")  # rewards 0.2 vs -0.1: the widest
    assert math.isclose(sum(candidates[0].a.logprobs), -5.0)


# ---------------------------------------------------------------------- a short SEA run


def test_sea_learns_the_closeness_rule_from_oracle_labels_and_picks_the_best_of_n():
    # SEA's selection and reward model on the built-in preference task, with the real closeness oracle: random
    # answers near the sum stand in for the policy's samples, so the run takes a second. The ensemble's
    # accuracy on the pairs it is then asked about (measured before it trains on them) must beat chance.
    oracle = RewardPreferenceOracle(FunctionOracle([("closeness", closeness_reward, 1.0)]))
    config = SEAConfig(ensemble=EnsembleConfig(num_members=8, hidden_size=64, batch_size=32, steps_per_iteration=20))
    selector = make_selector("sea-bai", seed=0, config=config, featurize=arithmetic_features)
    rng = random.Random(0)
    accuracy = []
    for iteration in range(30):
        candidates = selector.select(*_arithmetic_batch(rng, 32), Judge(oracle))
        accuracy.append(selector.observe(candidates)["sea/rm_accuracy"])
    late = [a for a in accuracy[-10:] if a == a]
    assert sum(late) / len(late) >= 0.75, accuracy
    assert task_prompt_format_is_arithmetic()
    # best-of-N by the trained ensemble: among 8 answers near the sum, its choice is the argmax of the members'
    # mean reward, and is nearer the sum than the first sample on average
    prompts, groups = _arithmetic_batch(rng, 64, n=8)
    picks = selector.best_of(prompts, groups)
    for p, g, k in zip(prompts, groups, picks):
        assert k == int(selector.reward_model.rewards(arithmetic_features([p] * len(g), g)).mean(0).argmax())
    chosen = sum(abs(int(g[k].text) - int(p.reference)) for p, g, k in zip(prompts, groups, picks)) / 64
    first = sum(abs(int(g[0].text) - int(p.reference)) for p, g in zip(prompts, groups)) / 64
    assert chosen < first - 1.0, (chosen, first)  # uniform errors in [-6, 6]: the first sample's mean is ~3.2
    untrained = make_selector("sea-bai", seed=0, config=config, featurize=arithmetic_features)
    assert untrained.best_of(prompts[:3], groups[:3]) == [0, 0, 0]  # no ensemble yet: the first sample


def test_best_of_n_win_rate_judges_the_choice_and_the_first_sample(tiny_model_dir):
    """`evaluate_best_of_n` on the real engine: the choices and the first samples, each against the reference."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from winnow.engines.hf import HFEngine
    from winnow.eval.win_rate import evaluate_best_of_n
    from winnow.types import SamplingParams

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, device="cpu")
    questions = [q for q, _ in make_task("arithmetic-pref", seed=0).examples("eval")[:6]]
    prompts = [Prompt(q, tokenizer(q)["input_ids"], reference=str(int(q[:2]) + int(q[3:5]))) for q in questions]
    references = ["1234"] * 6  # 4 digits: digit_count ties a 4-digit response and beats fewer
    oracle = RewardPreferenceOracle(FunctionOracle([("digit_count", digit_count, 1.0)]))

    def most_digits(prompts, groups):
        return [max(range(len(g)), key=lambda k: digit_count([], [g[k].text])[0]) for g in groups]

    result = evaluate_best_of_n(engine, oracle, prompts, references, pick=most_digits, n=4, max_tokens=6, seed=3)
    # the same draws again (keyed sampling): the win rates by hand
    completions = engine.generate([p.token_ids for p in prompts],
                                  SamplingParams(temperature=1.0, max_tokens=6, n=4, seed=3))
    groups = [completions[4 * i:4 * i + 4] for i in range(6)]

    def wins(texts):
        return sum(1.0 if d > 4 else 0.5 if d == 4 else 0.0 for d in digit_count([], texts)) / len(texts)

    picks = most_digits(prompts, groups)
    assert result.metrics["eval/best_of_n_win_rate"] == pytest.approx(wins([g[k].text for g, k in zip(groups, picks)]))
    assert result.metrics["eval/sample_win_rate"] == pytest.approx(wins([g[0].text for g in groups]))
    assert result.metrics["eval/best_of_n_pick_is_first"] == pytest.approx(sum(k == 0 for k in picks) / 6)
    assert result.metrics["eval/best_of_n_win_rate"] >= result.metrics["eval/sample_win_rate"]
    with pytest.raises(ValueError, match="n >= 2"):
        evaluate_best_of_n(engine, oracle, prompts, references, pick=most_digits, n=1, max_tokens=6)


def task_prompt_format_is_arithmetic() -> bool:
    """The features parse prompts of the built-in task's form ("a+b=")."""
    question, answer = make_task("arithmetic-pref", seed=0).examples("train")[0]
    features = arithmetic_features([Prompt(question, [1])], [_completion(answer)])
    a, b = (int(x) for x in question[:-1].split("+"))
    return torch.allclose(features, torch.tensor([[a / 10, b / 10, int(answer) / 10, 1.0]]))


# ---------------------------------------------------------------------- through the preference recipe


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    task = make_task("arithmetic-pref", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    return save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("explore") / "init")


def digit_count(prompts, completions, **columns):
    """A reward that tells an untrained model's responses apart (closeness calls them all -10: ties)."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def _run(tmp_path, model_dir, algo, selection, best_of_n=0, **pairs):
    from winnow.algorithms import PREFERENCE_OBJECTIVES
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.config import PairConfig, RolloutConfig, WinRateConfig
    from winnow.recipes.preference import PreferenceTrainConfig, train_preference
    from winnow.setup import ModelConfig

    config = PreferenceTrainConfig(
        algo=PREFERENCE_OBJECTIVES[algo](), model=ModelConfig(path=str(model_dir)), device="cpu", seed=0,
        rollout=RolloutConfig(prompts_per_iteration=8, num_samples=4, max_tokens=4),
        pairs=PairConfig(selection=selection, **pairs), learner=LearnerConfig(lr=1e-4, micro_batch_size=8),
        oracle=OracleConfig(rule=RuleOracleConfig(rewards=[f"{__file__}:digit_count"])),
        eval=WinRateConfig(every=0, max_prompts=8, best_of_n=best_of_n), num_iterations=3, logging=LoggingConfig(progress=False),
        output_dir=str(tmp_path), run_name=selection)
    return read_metrics(train_preference(config))


@pytest.mark.slow  # three 3-iteration runs of the tiny model: ~30 s alone, minutes on a loaded 2-core machine
def test_sea_xpo_and_apl_run_through_the_recipe_and_count_queries(tmp_path, tiny_model_dir):
    sea = SEAConfig(features="policy", mixed=True, mixed_burn_in=1, mixed_fraction=0.25,
                    ensemble=EnsembleConfig(num_members=4, hidden_size=16, batch_size=4))
    rows = _run(tmp_path, tiny_model_dir, "dpo", "sea-bai", best_of_n=4, sea=sea)
    last = rows[-1]
    evals = [r for r in rows if "eval/best_of_n_win_rate" in r]  # at the start and the end, beside the win rate
    assert len(evals) == 2 and all("eval/win_rate" in r and "eval/sample_win_rate" in r for r in evals)
    assert last["counts/eval_oracle_queries"] == 2 * (8 + 2 * 8)  # the win rate's 8, best-of-N's 16, twice
    # Iteration 1 asks about every prompt with 2 distinct texts; then 2 of 8 prompts are labelled by the model.
    assert last["counts/model_labelled_pairs"] + last["counts/oracle_queries"] <= 3 * 8
    assert last["counts/model_labelled_pairs"] > 0 and last["counts/shadow_queries"] == 0
    assert last["counts/pairs"] == last["counts/oracle_queries"] + last["counts/model_labelled_pairs"]
    assert "sea/rm_accuracy" in last and "sea/model_labelled_fraction" in last

    rows = _run(tmp_path, tiny_model_dir, "xpo", "xpo")
    assert rows[-1]["counts/oracle_queries"] == 3 * 8 == rows[-1]["counts/pairs"]
    assert any("train/pref/xpo_reference_logps" in r for r in rows)

    from winnow.exploration import APLConfig

    last = _run(tmp_path, tiny_model_dir, "dpo", "apl", apl=APLConfig(keep_fraction=0.5))[-1]
    assert last["counts/oracle_queries"] == 3 * 4 == last["counts/pairs"]  # half of each iteration's 8 prompts


def test_minilm_features_are_normalised_sentence_embeddings():
    from winnow.exploration.features import make_featurizer

    featurize = make_featurizer("minilm")
    prompts = [Prompt("12+30=", [1])] * 3
    features = featurize(prompts, [_completion("42"), _completion("42"), _completion("seven")])
    assert features.shape == (3, 384)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(features[0], features[1]) and not torch.allclose(features[0], features[2])


def _experiment_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "exploration_experiment.py"
    spec = importlib.util.spec_from_file_location("exploration_experiment", path)
    experiment = importlib.util.module_from_spec(spec)
    sys.modules["exploration_experiment"] = experiment  # its dataclasses look their module up
    spec.loader.exec_module(experiment)
    return experiment


def test_the_experiments_summary_and_criterion_by_hand():
    experiment = _experiment_module()
    curve = [(0, 0.40), (100, 0.55), (200, 0.65), (300, 0.75)]
    summary = experiment.summarise(curve, budget=300)
    # +0.20 (0.60) first reached at 200 queries, +0.30 (0.70) at 300; trapezoids: (47.5 + 60 + 70) / 300
    assert summary["queries_to_+0.20"] == 200 and summary["queries_to_+0.30"] == 300
    assert summary["auc"] == pytest.approx(177.5 / 300)
    runs = [{"arm": "random", "seed": s, "queries_to_+0.20": 300} for s in range(10)]
    sea = [100, 150, None, 120, 90, 100, 150, 120, 90, 100]
    runs += [{"arm": "sea-bai", "seed": s, "queries_to_+0.20": q} for s, q in enumerate(sea)]
    verdict = experiment.verdict(runs, budget=300)["sea-bai"]
    # ratios q / 300, the censored run at 2 x budget: 600 / 300 = 2; sorted .3 .3 .33 .33 .33 .4 .4 .5 .5 2,
    # median (0.333 + 0.4) / 2 = 0.367; the interval's top passes 1 only if 5 of 10 draws hit the censored run
    assert verdict["ratios"][2] == 2.0 and verdict["median"] == pytest.approx((1 / 3 + 0.4) / 2)
    assert verdict["censored_runs"] == 1 and verdict["ci95"][1] < 1 and verdict["reproduces"] is True
    few = experiment.verdict(runs[:2] + runs[10:12], budget=300)["sea-bai"]
    assert few["reproduces"] is None and "not evaluated" in few["note"]  # 2 seeds: no verdict


def test_the_rare_task_labels_only_pairs_that_hold_the_exact_sum():
    """`arithmetic-pref-rare` under the exact rule: the sum beats anything (the reference, off by 1, included) and
    every two wrong answers tie, so a random pair among 8 samples with one right answer is labelled with
    probability 7/28 = 0.25 (a pair holding the right one) and wasted otherwise."""
    from winnow.exploration import make_selector as make

    task = make_task("arithmetic-pref-rare", seed=0)
    question, answer = task.examples("train")[0]
    a, b = (int(x) for x in question[:-1].split("+"))
    assert 100 <= a <= 999 and 100 <= b <= 999 and answer == str(a + b)
    reference = task.extra_columns(question, answer)["reference_response"]
    assert reference == str(a + b + 1)
    oracle = RewardPreferenceOracle(FunctionOracle([("exact", exact_match_reward, 1.0)]))
    probabilities = oracle.compare([question] * 3, [answer, str(a + b - 5), "7"], [reference] * 3,
                                   [answer] * 3).probabilities
    assert probabilities == pytest.approx([1 / (1 + math.exp(-1)), 0.5, 0.5])  # sigmoid(1 - 0); ties
    prompts = [Prompt(question, [1], reference=answer)] * 400
    group = [_completion(answer)] + [_completion(str(a + b + k)) for k in (-3, -2, -1, 1, 2, 3, 10)]
    selector = make("random", seed=0)
    labelled = [c for c in selector.select(prompts, [group] * 400, Judge(oracle)) if c.probability != 0.5]
    assert abs(len(labelled) / 400 - 0.25) < 0.06  # binomial(400, 0.25): sd 0.022
    assert all(answer in (c.a.text, c.b.text) for c in labelled)
    experiment = _experiment_module()
    assert experiment.TASKS["rare"][:3] == ("arithmetic-pref-rare", "arithmetic-3digit", "exact")


def test_the_warm_start_is_the_first_evaluation_inside_the_accuracy_band():
    pick = _experiment_module().pick_warm_start
    band = (0.10, 0.20)
    assert pick([(25, 0.02), (50, 0.06)], band, is_last=False) is None  # below the band: train on
    assert pick([(25, 0.02), (50, 0.10)], band, is_last=False) == {"step": 50, "accuracy": 0.10, "in_band": True}
    # overshot from 0.08 to 0.35: 0.08 is 0.02 below the band, 0.35 is 0.15 above, so step 25, out of band
    assert pick([(25, 0.08), (50, 0.35)], band, is_last=False) == {"step": 25, "accuracy": 0.08, "in_band": False}
    assert pick([(25, 0.02), (50, 0.21)], band, is_last=False) == {"step": 50, "accuracy": 0.21, "in_band": False}
    # the last evaluation, still below: the nearer of the last two (0.07 is 0.03 below, 0.05 is 0.05 below)
    assert pick([(25, 0.07), (50, 0.05)], band, is_last=True) == {"step": 25, "accuracy": 0.07, "in_band": False}


def test_paired_differences_against_random_by_hand():
    paired = _experiment_module().paired
    runs = [{"arm": "random", "seed": s, "final": f, "auc": 0.5} for s, f in enumerate([0.5, 0.6, 0.7])]
    runs += [{"arm": "sea-ee", "seed": s, "final": f, "auc": a} for s, (f, a) in enumerate([(0.6, 0.5), (0.6, 0.6),
                                                                                          (0.9, 0.7)])]
    row = paired(runs)["sea-ee"]
    # final: 0.1, 0.0, 0.2 -> mean 0.1, higher in 2 of 3; AUC: 0.0, 0.1, 0.2 -> mean 0.1, higher in 2 of 3
    assert row["seeds"] == 3 and row["final_minus_random_mean"] == pytest.approx(0.1)
    assert row["final_higher_in"] == "2/3" and row["auc_higher_in"] == "2/3"
    low, high = row["final_minus_random_ci95"]
    assert 0.0 <= low <= 0.1 <= high <= 0.2 + 1e-9  # a bootstrap of means of {0.1, 0.0, 0.2} stays in [0, 0.2]
