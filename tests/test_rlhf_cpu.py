"""Classic RLHF end to end on CPU, short (`benchmarks/rlhf_cpu.py --fast`): the quickstart's SFT warm start,
comparisons of its samples labelled by the rule, a reward model trained on them to held-out accuracy well above
chance, then PPO against that model served by Mosec (`winnow serve-oracle`, `--oracle.kind remote`), which raises
the model's score; `--gold-rewards` logs the task's rules on the same samples (not asserted to rise: a run this
short does not raise them reliably, see below). Also `pair_agreement` by hand."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from winnow.loops.rl import pair_agreement


def _script():
    path = Path(__file__).parents[1] / "benchmarks" / "rlhf_cpu.py"
    spec = importlib.util.spec_from_file_location("rlhf_cpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rlhf_cpu"] = module
    spec.loader.exec_module(module)
    return module


def test_pair_agreement_by_hand():
    # truth 1 for scores 3 and 2, truth 0 for 1 and 2.5: pairs (3>1 yes) (3>2.5 yes) (2>1 yes) (2>2.5 no) = 3/4
    assert pair_agreement([3.0, 1.0, 2.0, 2.5], [1.0, 0.0, 1.0, 0.0]) == 0.75
    assert pair_agreement([1.0, 1.0], [0.0, 1.0]) == 0.5  # a tie counts half
    # three levels: (0 vs 1) 1>0? no -> 0; (0 vs 2) 5>0 yes; (1 vs 2) 5>1 yes -> 2/3; unscored rows are left out
    assert pair_agreement([0.0, 1.0, 5.0, None], [1.0, 0.0, 2.0, 2.0]) == pytest.approx(2 / 3)
    assert pair_agreement([1.0, 2.0], [1.0, 1.0]) is None  # no pair differs in truth


def test_gold_rewards_are_refused_where_they_are_not_scored():
    from winnow.algorithms import GRPO
    from winnow.recipes.rl import TrainConfig, train

    with pytest.raises(ValueError, match="--gold-rewards .* local runtime only"):
        train(TrainConfig(algo=GRPO(), runtime="ray", gold_rewards=["exact"]))


@pytest.mark.slow
def test_sft_then_reward_model_then_ppo_on_the_served_model(tmp_path, monkeypatch):
    monkeypatch.setattr("winnow.recipes.base.plot_run", lambda run_dir: [])  # read through the metrics
    script = _script()
    result = script.run(tmp_path, script.FAST)
    assert result["reward_model_served"]
    accuracy = [a for _, a in result["reward_model"]["held_out_pair_accuracy"]]
    # 200 held-out pairs of the SFT model's own samples (chance 0.5, sd 0.035); measured 0.675, 0.755, 0.688 with
    # seeds 0, 1, 2 after 300 steps (from 0.47-0.52 at step 0)
    assert accuracy[-1] > 0.63 and accuracy[-1] > accuracy[0] + 0.1, accuracy
    # the model's score over the first and last 10 of 40 iterations, measured with seeds 0, 1, 2: 1.03 -> 1.08,
    # 0.67 -> 0.99, 0.94 -> 1.37. The rules' rewards are not asserted: in this short run they do not move reliably
    # (exact 0.189 -> 0.183, 0.197 -> 0.166, 0.197 -> 0.216); the full run's three seeds are in the README
    window = result["ppo"][f"mean_of_first_and_last_{script.FAST['window']}_iterations"]
    assert window["reward_model_score"]["last"] > window["reward_model_score"]["first"], window
    assert 0.5 < window["oracle_pair_accuracy"]["first"] < 1.0, window  # the gold rule scored the same samples
    curves = result["ppo"]["curves"]
    assert len(curves["iteration"]) == script.FAST["ppo_iterations"]
    assert all(0.0 <= x <= 1.0 for x in curves["exact"]) and all(-10.0 <= x <= 0.0 for x in curves["closeness"])
