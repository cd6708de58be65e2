"""End-to-end runs on the tiny model that must learn (and, with a wrong reward, must unlearn).

One quickstart run (SFT warm start + GRPO, the README's promise) is shared by the module: its SFT model is
the starting point of the other runs, which go through the real CLI with a config file.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from winnow.logging import read_metrics
from winnow.quickstart import QuickstartConfig, quickstart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    result = quickstart(QuickstartConfig(output_dir=str(out), progress=False))
    return out, result


def test_quickstart_raises_held_out_accuracy_by_25_points(quickstart_run):
    out, result = quickstart_run
    assert result["after"] - result["before"] >= 0.25, result
    rows = read_metrics(out / "grpo")
    evals = [r for r in rows if "eval/greedy_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows[-1]["step"]
    assert evals[-1]["eval/mean@4_accuracy"] > evals[0]["eval/mean@4_accuracy"]
    # Every phase is timed, the counters add up, and the curves were drawn.
    last = rows[-1]
    for phase in ("generate", "score", "advantages", "train", "sync"):
        assert last[f"time/{phase}"] >= 0
    assert last["counts/samples"] == last["step"] * 32 * 8
    assert last["counts/optimizer_steps"] == last["step"]
    assert last["counts/unscored_samples"] == 0
    assert (out / "grpo" / "plots" / "summary.png").stat().st_size > 10_000
    assert (out / "grpo" / "final" / "config.json").exists()
    assert yaml.safe_load((out / "grpo" / "config.yaml").read_text())["rollout"]["num_samples"] == 8


REWARDS = '''
def right(prompts, completions, reference, **columns):
    return [float(c.strip() == r) for c, r in zip(completions, reference)]

def wrong(prompts, completions, reference, **columns):
    """Rewards any well-formed wrong answer: training on it must make accuracy fall."""
    return [float(c.strip().isdigit() and c.strip() != r) for c, r in zip(completions, reference)]
'''


def _train_cli(tmp_path: Path, algo: str, model: Path, weights: list[float], iterations: int,
               share_prompts: bool = False) -> Path:
    """Train with reward = weights[0] * right + weights[1] * wrong; `right`, listed first, is the verifier
    that held-out accuracy is measured with."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    config = {
        "model": {"path": str(model)},
        "oracle": {"rewards": [f"{tmp_path / 'rewards.py'}:right", f"{tmp_path / 'rewards.py'}:wrong"],
                   "reward_weights": weights},
        "rollout": {"prompts_per_iteration": 32, "num_samples": 8, "max_tokens": 8},
        "learner": {"lr": 3e-5, "micro_batch_size": 256, "share_prompts": share_prompts},
        "eval": {"every": 0, "k": 0, "max_prompts": 200},
        "logging": {"progress": False},
        "num_iterations": iterations,
        "device": "cpu",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    subprocess.run(
        [sys.executable, "-m", "winnow.cli", "train", algo, "--config", str(tmp_path / "run.yaml"),
         "--output-dir", str(tmp_path), "--run-name", "run"],
        check=True, timeout=900,
    )
    return tmp_path / "run"


def _accuracy(run_dir: Path) -> tuple[float, float]:
    evals = [r["eval/greedy_accuracy"] for r in read_metrics(run_dir) if "eval/greedy_accuracy" in r]
    return evals[0], evals[-1]


@pytest.mark.parametrize("algo", ["dr-grpo", "rloo"])
def test_cli_run_with_user_reward_learns(quickstart_run, tmp_path, algo):
    out, _ = quickstart_run
    # RLOO's learner runs each prompt once for its 8 samples (--learner.share-prompts): it must learn all the same.
    run = _train_cli(tmp_path, algo, out / "sft" / "final", [1.0, 0.0], iterations=60, share_prompts=algo == "rloo")
    before, after = _accuracy(run)
    assert after >= before + 0.1, (before, after)
    samples = [json.loads(line) for line in (run / "samples" / "eval_00060.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "reference", "correct"} <= set(samples[0])


def test_inverted_reward_makes_accuracy_fall(quickstart_run, tmp_path):
    out, _ = quickstart_run
    before, after = _accuracy(_train_cli(tmp_path, "grpo", out / "sft" / "final", [0.0, 1.0], iterations=40))
    assert after <= before - 0.1, (before, after)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "winnow.cli", *args], capture_output=True, text=True,
                          check=True, timeout=600)


def test_eval_cli_reproduces_the_runs_own_held_out_accuracy(quickstart_run):
    """`winnow eval` on the SFT model scores the same 200 held-out prompts greedily: same number."""
    out, _ = quickstart_run
    sft_final = [r for r in read_metrics(out / "sft") if "eval/greedy_accuracy" in r][-1]
    printed = _cli("eval", "--model.path", str(out / "sft" / "final"), "--oracle.rewards", "exact",
                   "--eval.k", "0", "--eval.max-prompts", "200", "--max-tokens", "8", "--device", "cpu").stdout
    assert f"eval/greedy_accuracy: {sft_final['eval/greedy_accuracy']:.4f}" in printed


def test_sft_cli_on_a_jsonl_file_and_plot(quickstart_run, tmp_path):
    out, _ = quickstart_run
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10, 30) for b in range(10, 30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli("sft", "--model.path", str(out / "init"), "--data.train", str(tmp_path / "pairs.jsonl"),
         "--data.answer-column", "completion", "--num-steps", "40", "--batch-size", "64",
         "--learner.lr", "1e-3", "--eval.every", "0", "--max-tokens", "8", "--device", "cpu",
         "--output-dir", str(tmp_path), "--run-name", "sft", "--logging.no-progress")
    nll = [r["train/nll"] for r in read_metrics(tmp_path / "sft") if "train/nll" in r]
    assert len(nll) == 40 and nll[-1] < 0.5 * nll[0]
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
    paths = _cli("plot", str(tmp_path / "sft"), "--x", "samples").stdout.split()
    assert any(p.endswith("train.png") for p in paths)


def test_a_seeded_run_replays_exactly(quickstart_run, tmp_path):
    """Same seed, same config: the same samples, rewards and losses, iteration by iteration."""
    from winnow.algorithms import GRPO
    from winnow.loops.config import EvalConfig, RolloutConfig
    from winnow.recipes.rl import TrainConfig
    from winnow.setup import ModelConfig
    from winnow.logging import LoggingConfig
    from winnow.recipes.rl import train

    out, _ = quickstart_run
    keys = ("reward/mean", "train/loss", "train/grad_norm", "rollout/generated_tokens")
    runs = []
    for name in ("a", "b"):
        config = TrainConfig(
            algo=GRPO(), model=ModelConfig(path=str(out / "sft" / "final")), num_iterations=4, seed=3,
            rollout=RolloutConfig(prompts_per_iteration=16, num_samples=4, max_tokens=8),
            eval=EvalConfig(every=0, k=2, max_prompts=50), logging=LoggingConfig(progress=False),
            output_dir=str(tmp_path), run_name=name, device="cpu", save_final=False,
        )
        rows = read_metrics(train(config))
        runs.append([[row.get(k) for k in keys] for row in rows])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0][1:]}) > 1  # and the iterations differ from each other


def test_lora_grpo_learns_through_the_cli(quickstart_run, tmp_path):
    """Rank-8 adapters through the CLI raise held-out accuracy, with the sync check every iteration.

    Measured (CPU; lr 1e-3, rank 8, alpha 16): 42.5% -> 75.5% after 30 iterations with seed 1, 42.5% -> 71%
    after 60 with seed 0; lr 3e-4 gave 74.5% after 30. LoRA takes a ~30x larger lr than full fine-tuning
    here (3e-5): its update is low-rank and starts from B = 0.
    """
    pytest.importorskip("peft")
    sft_model = quickstart_run[0] / "sft" / "final"
    subprocess.run(
        [sys.executable, "-m", "winnow.cli", "train", "grpo", "--model.path", str(sft_model),
         "--oracle.rewards", "exact", "--rollout.prompts-per-iteration", "32", "--rollout.num-samples", "8",
         "--rollout.max-tokens", "8", "--learner.lr", "1e-3", "--learner.micro-batch-size", "256",
         "--lora-rank", "8", "--lora-alpha", "16", "--sync.check-sync", "--num-iterations", "30",
         "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "200", "--logging.no-progress",
         "--device", "cpu", "--seed", "1", "--output-dir", str(tmp_path), "--run-name", "run"],
        check=True, timeout=900,
    )
    rows = read_metrics(tmp_path / "run")
    evals = [r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r]
    before, after = evals[0], evals[-1]
    assert after >= before + 0.15, (before, after)
    # The engine ran the merged adapters every iteration (check-sync compares it with the learner) ...
    assert max(r["sync/logprob_diff_max"] for r in rows if "sync/logprob_diff_max" in r) < 1e-3
    # ... and the final model is a plain merged checkpoint, with the adapter beside it.
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_winnow_train_ppo_raises_held_out_accuracy(quickstart_run, tmp_path):
    """From the quickstart's SFT warm start (seed 0, 250 steps), `winnow train ppo` through the CLI with
    ONE sample per prompt (the critic is the only baseline). Measured on this 2-core CPU (one thread): held-out
    greedy accuracy 0.305 -> 0.64 after 60 iterations (seed 0; with PPO seed 2 on the same warm start 0.69;
    from a seed-1 warm start 0.395 -> 0.71), about 40 s of PPO."""
    sft = quickstart_run[0] / "sft"
    config = {
        "model": {"path": str(sft / "final")},
        "oracle": {"rewards": ["exact"]},
        "rollout": {"prompts_per_iteration": 64, "num_samples": 1, "max_tokens": 8},
        "learner": {"lr": 3e-5, "micro_batch_size": 256},
        "algo": {"critic_lr": 3e-4},
        "eval": {"every": 0, "k": 0, "max_prompts": 200},
        "logging": {"progress": False},
        "num_iterations": 60, "device": "cpu", "num_threads": 1,
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "winnow.cli", "train", "ppo", "--config", str(tmp_path / "ppo.yaml"),
                    "--output-dir", str(tmp_path), "--run-name", "ppo"], check=True, timeout=600)
    rows = read_metrics(tmp_path / "ppo")
    evals = [r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r]
    assert evals[-1] >= evals[0] + 0.15, evals
    last = rows[-1]
    assert last["counts/samples"] == 60 * 64 and last["rollout/trained_samples"] == 64  # groups of one are kept
    for key in ("critic/explained_variance", "critic/old_value_mean", "train/critic/value_loss",
                "train/critic/value_clip_fraction", "train/critic/value_mean", "train/clip_fraction"):
        assert math.isfinite(last[key]), key
    assert last["critic/old_value_mean"] > 0.05  # the critic has learned the success rate, starting from V = 0
    assert (tmp_path / "ppo" / "critic" / "value_head.pt").exists()
