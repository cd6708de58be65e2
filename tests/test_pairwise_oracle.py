"""The pairwise preference model (`--oracle.kind pairwise`): P(a beats b) from one model reading the prompt and
both responses, symmetric by construction (checked against the model's own forwards); `winnow train rm --kind
pairwise` learns held-out pairs; the two kinds of saved model are never mistaken for each other; a short online
DPO run is judged by it. Serving is tested in `test_model_service.py`."""
from __future__ import annotations

import math

import pytest
import torch

from test_reward_model import rm_config, tiny_backbone  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def pairwise_dir(tmp_path_factory):
    """A tiny random-weight Qwen2 pairwise model (num_labels=1, marked pairwise) and its character tokenizer."""
    from transformers import Qwen2ForSequenceClassification

    from winnow.data.tiny import save_tokenizer, tiny_qwen2_config, train_char_tokenizer
    from winnow.oracles.reward_model import KIND_KEY

    tokenizer = train_char_tokenizer(["0123456789+-*= abcdefghijklmnopqrstuvwxyz"])
    config = tiny_qwen2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    setattr(config, KIND_KEY, "pairwise")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pairwise") / "pm"
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


@pytest.fixture()
def no_plots(monkeypatch):
    """Runs here are read through their metrics; drawing their figures would double the tests' time."""
    monkeypatch.setattr("winnow.recipes.base.plot_run", lambda run_dir: [])


PROMPTS = ["12+34=", "50+17=", "9+9=", "70+21="]
A = ["46", "67", "18", "91"]
B = ["460", "66", "81", "abc"]


def test_pairwise_probability_is_the_models_two_orders_and_symmetric(pairwise_dir):
    from winnow.oracles.pairwise import PairwiseOracle

    oracle = PairwiseOracle.from_pretrained(str(pairwise_dir), batch_size=3)
    p_ab = oracle.compare(PROMPTS, A, B).probabilities
    p_ba = oracle.compare(PROMPTS, B, A).probabilities
    assert [x + y for x, y in zip(p_ab, p_ba)] == pytest.approx([1.0] * 4, abs=1e-6)  # exactly symmetric
    assert oracle.compare(PROMPTS, A, A).probabilities == pytest.approx([0.5] * 4, abs=1e-6)  # never beats itself
    assert len({round(p, 4) for p in p_ab}) == 4  # random weights: the pairs differ, so a mix-up would show
    # by hand: one forward per order on "prompt" + "a<eos>b", the logit of the last real token, sigmoid of the gap
    model, tokenizer = oracle.scorer.model, oracle.scorer.tokenizer
    for prompt, a, b, p in zip(PROMPTS, A, B, p_ab):
        def f(first, second):
            ids = tokenizer(prompt, f"{first}<eos>{second}")["input_ids"]
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

        assert p == pytest.approx(1 / (1 + math.exp(-(f(a, b) - f(b, a)))), abs=1e-5)
    # the temperature divides the log-odds
    warm = PairwiseOracle.from_pretrained(str(pairwise_dir), temperature=2.0).compare(PROMPTS, A, B).probabilities
    assert warm == pytest.approx([1 / (1 + math.exp(-math.log(p / (1 - p)) / 2)) for p in p_ab], abs=1e-5)


def test_the_two_kinds_of_model_refuse_each_other(pairwise_dir, tmp_path):
    from transformers import Qwen2ForSequenceClassification

    from winnow.oracles import OracleConfig, PairwiseOracleConfig, make_oracle
    from winnow.oracles.pairwise import PairwiseOracle
    from winnow.oracles.reward_model import RewardModelOracle

    with pytest.raises(ValueError, match="is a pairwise preference model .* use --oracle.kind pairwise"):
        RewardModelOracle.from_pretrained(str(pairwise_dir))
    scalar = Qwen2ForSequenceClassification.from_pretrained(pairwise_dir)
    delattr(scalar.config, "winnow_reward_kind")
    scalar.save_pretrained(tmp_path / "scalar")
    (tmp_path / "scalar" / "tokenizer.json").write_bytes((pairwise_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="is not a pairwise preference model .* `winnow train rm --kind pairwise`"):
        PairwiseOracle.from_pretrained(str(tmp_path / "scalar"))
    # it compares, never rewards: RL or best-vs-worst pairs are refused before anything loads
    config = OracleConfig(kind="pairwise", pairwise=PairwiseOracleConfig(path=str(pairwise_dir)))
    with pytest.raises(ValueError, match="--oracle.kind pairwise only compares responses"):
        make_oracle(config, needs="reward")
    with pytest.raises(ValueError, match="kind='pairwise' needs --oracle.pairwise.path"):
        OracleConfig(kind="pairwise")


def test_remote_pairwise_compares_on_the_service_and_never_rewards():
    from winnow.oracles import OracleConfig, RemoteOracleConfig, make_oracle
    from winnow.oracles.pairwise import ServedPairwiseOracle

    config = OracleConfig(kind="remote", remote=RemoteOracleConfig(url="http://127.0.0.1:9", pairwise=True))
    with pytest.raises(ValueError, match="--oracle.kind remote --oracle.remote.pairwise only compares responses"):
        make_oracle(config, needs="reward")
    oracle = make_oracle(config, needs="compare")
    assert isinstance(oracle, ServedPairwiseOracle)
    oracle.close()


def test_train_rm_pairwise_learns_held_out_pairs(tiny_backbone, tmp_path, no_plots):  # noqa: F811
    from winnow.logging import read_metrics
    from winnow.oracles.pairwise import PairwiseOracle
    from winnow.recipes.rm import train_reward_model

    run = train_reward_model(rm_config(tiny_backbone, tmp_path, kind="pairwise", num_steps=12, eval_every=12))
    evals = [r for r in read_metrics(run) if "eval/pair_accuracy" in r]
    assert evals[-1]["eval/pair_accuracy"] > 0.9, evals  # chance is 0.5
    assert evals[-1]["eval/pair_loss"] < evals[0]["eval/pair_loss"] - 0.3, evals
    oracle = PairwiseOracle.from_pretrained(str(run / "final"))
    prompts, good, bad = ["12+34=", "50+17=", "23+45="], ["46", "67", "68"], ["460", "670", "680"]
    p_good = oracle.compare(prompts, good, bad).probabilities
    assert all(p > 0.5 for p in p_good), p_good  # the right sum wins, whichever side it is shown on
    assert oracle.compare(prompts, bad, good).probabilities == pytest.approx([1 - p for p in p_good], abs=1e-6)


def test_online_dpo_is_judged_by_the_pairwise_model(pairwise_dir, tmp_path, no_plots):
    """A short online DPO run (random pairs; the pairwise model also judges the held-out win rate)."""
    from winnow.algorithms import DPO
    from winnow.data import DataConfig
    from transformers import PreTrainedTokenizerFast

    from winnow.data.tiny import build_tiny_model, save_tiny
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.config import PairConfig, RolloutConfig, WinRateConfig
    from winnow.oracles import PairwiseOracleConfig
    from winnow.recipes.preference import PreferenceTrainConfig, train_preference
    from winnow.setup import ModelConfig

    import dataclasses

    tokenizer = PreTrainedTokenizerFast.from_pretrained(pairwise_dir)
    oracle = dataclasses.replace(PreferenceTrainConfig(algo=DPO()).oracle, kind="pairwise",  # the command's defaults
                                 pairwise=PairwiseOracleConfig(path=str(pairwise_dir)))
    save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "policy")
    config = PreferenceTrainConfig(
        algo=DPO(), model=ModelConfig(path=str(tmp_path / "policy")), device="cpu", num_threads=1,
        data=DataConfig(train="arithmetic-pref", num_train_prompts=32, max_eval_prompts=8),
        oracle=oracle, rollout=RolloutConfig(prompts_per_iteration=8, num_samples=4, max_tokens=4),
        pairs=PairConfig(selection="random"), learner=LearnerConfig(lr=1e-4),
        eval=WinRateConfig(every=2, max_prompts=8), num_iterations=2, logging=LoggingConfig(progress=False),
        output_dir=str(tmp_path), run_name="dpo", save_final=False)
    rows = read_metrics(train_preference(config))
    judged = [r for r in rows if "pairwise/latency_s" in r and "counts/oracle_queries" in r]
    assert len(judged) == 2 and judged[-1]["counts/oracle_queries"] == 2 * 8  # one comparison per prompt
    last = judged[-1]
    # a random-weight pairwise model never ties two different texts: every distinct pair is trained on
    assert last["counts/trained_pairs"] + last["counts/tied_pairs"] + last["counts/unjudged_pairs"] == 16
    assert last["counts/unjudged_pairs"] == 0 and last["counts/trained_pairs"] >= 8
    assert last["counts/optimizer_steps"] >= 2 and math.isfinite(last["train/loss"])
    wins = [r["eval/win_rate"] for r in rows if "eval/win_rate" in r]
    assert len(wins) == 2 and all(0.0 <= w <= 1.0 for w in wins)
