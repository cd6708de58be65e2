"""Config files, command-line overrides, the resolved config, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from winnow.algorithms import GRPO, DrGRPO
from winnow.config import load_config_file, merge, parse, save_config
from winnow.recipes.rl import TrainConfig


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "num_iterations": 7,
        "learner": {"lr": 3e-5, "micro_batch_size": 8},
        "rollout": {"num_samples": 4},
        "algo": {"clip_high": 0.28},
    }))
    config = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()),
                   ["--config", str(path), "--learner.lr", "1e-4", "--rollout.temperature", "0.9"], prog="t")
    assert config.num_iterations == 7                  # from the file
    assert config.learner.micro_batch_size == 8        # from the file
    assert config.learner.lr == 1e-4                   # the flag beats the file
    assert config.rollout.temperature == 0.9           # flag only
    assert config.rollout.num_samples == 4
    assert config.algo.clip_high == 0.28 and config.algo.clip_low == 0.2  # file, default


def test_toml_and_python_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('num_iterations = 3\n[oracle.rule]\nrewards = ["math", "boxed_format"]\nreward_weights = [1.0, 0.1]\n')
    config = merge(TrainConfig(algo=DrGRPO()), load_config_file(toml))
    assert config.oracle.rule.rewards == ["math", "boxed_format"] and config.oracle.rule.reward_weights == [1.0, 0.1]
    assert config.algo.loss_agg == "seq-mean-token-sum-norm"  # Dr. GRPO's default survives the merge
    py = tmp_path / "run.py"
    py.write_text("config = {'seed': 5, 'data': {'train': 'arithmetic-3digit'}}\n")
    config = merge(TrainConfig(algo=GRPO()), load_config_file(py))
    assert config.seed == 5 and config.data.train == "arithmetic-3digit"


def test_resolved_config_round_trips(tmp_path):
    config = TrainConfig(algo=GRPO(clip_high=0.28), num_iterations=3)
    path = save_config(config, tmp_path / "config.yaml")
    again = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), ["--config", str(path)], prog="t")
    assert again == config


@pytest.mark.parametrize(
    "data,message",
    [
        ({"learner": {"learning_rate": 1e-5}}, r"unknown config key learner\.'learning_rate'.*valid keys.*lr"),
        ({"num_iterations": "ten"}, "num_iterations must be int"),
        ({"rollout": {"stop": "</answer>"}}, "rollout.stop must be a list"),
        ({"algo": {"loss_agg": "sum"}}, "loss_agg"),
        ({"learner": {"lr_schedule": "exp"}}, "--learner.lr-schedule"),
    ],
)
def test_bad_config_values_give_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        merge(TrainConfig(algo=GRPO()), data)


def test_missing_or_unknown_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    bad = tmp_path / "run.ini"
    bad.write_text("x=1")
    with pytest.raises(ValueError, match="unknown format"):
        load_config_file(bad)


def _winnow(*args):
    return subprocess.run([sys.executable, "-m", "winnow.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_lists_commands_and_flags():
    top = _winnow("--help")
    assert top.returncode == 0 and "winnow train ALGO" in top.stdout and "quickstart" in top.stdout
    train = _winnow("train", "--help")
    assert train.returncode == 0 and "grpo, dr-grpo, rloo" in train.stdout
    grpo = _winnow("train", "grpo", "--help")
    assert grpo.returncode == 0
    for flag in ("--learner.lr", "--rollout.num-samples", "--algo.clip-high", "--oracle.rule.rewards", "--config FILE"):
        assert flag in grpo.stdout
    # Field docstrings are the help text.
    assert "responses sampled per prompt" in grpo.stdout


def test_cli_errors_name_the_problem():
    unknown = _winnow("train", "ppo2")
    assert unknown.returncode != 0 and "unknown algorithm 'ppo2'" in unknown.stderr
    no_model = _winnow("train", "grpo", "--num-iterations", "1")
    assert no_model.returncode != 0 and "--model.path" in no_model.stderr
