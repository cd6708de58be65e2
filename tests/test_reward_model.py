"""Reward-model training (`winnow train rm`): the Bradley-Terry loss against hand-worked values, and a tiny
reward model that learns to prefer the right sum on the built-in preference task."""
from __future__ import annotations

import math

import pytest
import torch

from winnow.algorithms.reward_model import bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2 = 0.6931472; mean 0.5032044
    assert float(loss) == pytest.approx(0.5032044, abs=1e-6)
    assert metrics["rm/accuracy"] == 0.5  # the tie counts as wrong
    assert metrics["rm/margin"] == pytest.approx(0.5) and metrics["rm/score_mean"] == pytest.approx(0.25)
    # a margin of 1 on the first pair: both targets are 0, loss log 2
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    # centring 0.1 * mean((1 + 0)^2, (0 + 0)^2) = 0.05 on top; the reported BT part is unchanged
    loss, metrics = bradley_terry_loss(chosen, rejected, centring_coef=0.1)
    assert float(loss) == pytest.approx(0.5032044 + 0.05, abs=1e-6)
    assert metrics["rm/bt_loss"] == pytest.approx(0.5032044, abs=1e-6)


def test_bradley_terry_gradient_by_hand():
    chosen, rejected = torch.tensor([2.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected, centring_coef=0.5)
    loss.backward()
    # d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(1)) = -0.2689414; centring 0.5 * 2 * (c + r) = 3
    assert float(chosen.grad) == pytest.approx(-0.2689414 + 3.0, abs=1e-6)
    assert float(rejected.grad) == pytest.approx(0.2689414 + 3.0, abs=1e-6)


def test_bradley_terry_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both be \[P\]"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A tiny causal LM (random weights) and its character tokenizer, saved: the reward model's backbone."""
    from winnow.data import make_task
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

    task = make_task("arithmetic-pref", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    return save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("rm") / "backbone")


def write_pairs(path, num_pairs: int, seed: int = 0):
    """Addition pairs: the right sum beats the right sum with a 0 appended (learnable from the surface, so a
    random-weight backbone learns it in a few steps; a warm-started policy's backbone learns subtler pairs)."""
    import json
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b) + "0"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rm_config(backbone, tmp_path, **overrides):
    from winnow.data import DataConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.recipes.rm import RewardModelTrainConfig
    from winnow.setup import ModelConfig

    pairs = write_pairs(tmp_path / "pairs.jsonl", 400)
    fields = dict(
        model=ModelConfig(path=str(backbone)), logging=LoggingConfig(progress=False),
        data=DataConfig(train=str(pairs), answer_column=None, eval_fraction=0.1),
        learner=LearnerConfig(lr=3e-3, warmup_steps=2, micro_batch_size=64), batch_size=16, num_steps=20,
        eval_every=10, max_length=32, device="cpu", output_dir=str(tmp_path), run_name="rm")
    return RewardModelTrainConfig(**{**fields, **overrides})


def test_train_rm_learns_held_out_pairs(tiny_backbone, tmp_path):
    from winnow.logging import read_metrics
    from winnow.oracles.reward_model import RewardModelOracle
    from winnow.recipes.rm import train_reward_model

    run = train_reward_model(rm_config(tiny_backbone, tmp_path))
    evals = [r for r in read_metrics(run) if "eval/pair_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["eval/pair_accuracy"] > 0.9, evals  # chance is 0.5
    assert evals[-1]["eval/reward_margin"] > 0.5 and evals[-1]["eval/pair_loss"] < evals[0]["eval/pair_loss"] - 0.3
    # the saved model loads as the reward-model oracle and scores held-out style pairs the same way
    oracle = RewardModelOracle.from_pretrained(str(run / "final"))
    good, bad = oracle.scores(["12+34=", "50+17="], ["46", "67"]), oracle.scores(["12+34=", "50+17="], ["460", "670"])
    assert all(g > b for g, b in zip(good, bad))


@pytest.mark.slow  # ~100 s on a loaded 2-core machine (PEFT wrapping and the merged save)
def test_train_rm_with_lora_trains_the_head_and_saves_it_merged(tiny_backbone, tmp_path):
    from winnow.learner.lora import LoraConfig
    from winnow.logging import read_metrics
    from winnow.oracles.reward_model import RewardModelOracle
    from winnow.recipes.rm import train_reward_model

    run = train_reward_model(rm_config(tiny_backbone, tmp_path, lora=LoraConfig(rank=8, target_modules=["all-linear"]),
                                       num_steps=10, eval_every=10))
    evals = [r for r in read_metrics(run) if "eval/pair_accuracy" in r]
    assert evals[-1]["eval/pair_accuracy"] > 0.9 and evals[-1]["eval/reward_margin"] > 1.0, evals  # measured 1.0, 5.4
    # the merged checkpoint (adapters folded in, the score head trained in full) scores like the trained model
    oracle = RewardModelOracle.from_pretrained(str(run / "final"))
    assert oracle.scores(["12+34="], ["46"])[0] > oracle.scores(["12+34="], ["460"])[0]
