"""recipes/r1_zero.py, the single-file R1-Zero recipe: a short CPU run on the built-in arithmetic task learns, and
logs what R1-Zero studies look at."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from winnow.learner.learner import LearnerConfig
from winnow.logging import LoggingConfig, read_metrics
from winnow.quickstart import QuickstartConfig, warm_start

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "r1_zero.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("r1_zero_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as `import` does (dataclasses look the module up)
    spec.loader.exec_module(module)
    return module


def test_format_reward_by_template():
    recipe = load_recipe()
    prompts = ["... Assistant: <think>", "... Assistant: <think>", "put it within \\boxed{}.", "12+34="]
    completions = [" add them </think> <answer> 46 </answer>", " 46", "so \\boxed{46}", "46"]
    assert recipe.format_reward(prompts, completions) == [1.0, 0.0, 1.0, 1.0]
    assert recipe.format_reward(["12+34="], ["46 is it"]) == [0.0]


def test_truncated_responses_score_zero_when_asked():
    """--zero-truncated (the Dr. GRPO paper's code): a response cut off at the budget earns 0 even when its text
    grades right; finished responses keep their scores and an unscored one stays unscored."""
    from winnow.types import Completion

    recipe = load_recipe()
    completions = [Completion([1], [2], [0.0], reason, "") for reason in ("stop", "length", "length", "stop")]
    assert recipe.zero_truncated_scores([1.0, 1.0, None, 0.5], completions) == [1.0, 0.0, None, 0.5]


@pytest.mark.slow
def test_short_r1_zero_run_raises_held_out_accuracy(tmp_path):
    recipe = load_recipe()
    sft_model = warm_start(QuickstartConfig(output_dir=str(tmp_path / "warm"), sft_steps=150, num_threads=1,
                                            device="cpu", progress=False))
    run = recipe.train(recipe.R1ZeroConfig(
        model_path=str(sft_model), num_iterations=25, eval_every=25, eval_prompts=200, prompts_per_iteration=32,
        learner=LearnerConfig(lr=3e-5, micro_batch_size=256), output_dir=str(tmp_path / "r1"), device="cpu",
        num_threads=1, logging=LoggingConfig(progress=False)))
    rows = read_metrics(run)
    evals = [r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r]
    assert len(evals) == 2 and evals[-1] > evals[0] + 0.05, evals  # measured: 19.0% -> 28.5%
    for key in ("r1/accuracy", "r1/length_correct", "r1/length_incorrect", "r1/format_rate", "r1/clipped_fraction",
                "train/loss", "sync/seconds"):
        assert any(key in r for r in rows), key
    assert all(0.0 <= r["r1/format_rate"] <= 1.0 for r in rows if "r1/format_rate" in r)
