"""Classic RLHF end to end on CPU: SFT -> reward model -> PPO, and whether the policy's reward-model score and
the task's true rule reward both rise.

    PYTHONPATH=$PWD python benchmarks/rlhf_cpu.py --out benchmarks/results/rlhf_cpu     # ~10 min on 2 cores
    PYTHONPATH=$PWD python benchmarks/rlhf_cpu.py --fast --out /tmp/rlhf_fast            # the test's settings

1. SFT: the quickstart's warm start (the tiny model on 2-digit addition, `winnow.quickstart.warm_start`).
2. Reward model: `winnow train rm` (`train_reward_model`) from the SFT model's backbone on preference pairs of
   the addition task's train split: the right sum (chosen) against a wrong one (rejected: off by 1-10 either way,
   the mistakes the policy makes), labelled by the rule as a human would label them in the classic pipeline; the
   pairs of the task's eval split are held out (pair accuracy, chance 0.5). (Pairs of two wrong answers labelled
   by closeness were tried first: the model stayed at chance, 0.53 after 300 steps.)
3. PPO (`winnow train ppo`, one sample per prompt, the critic as the only baseline, a k1 KL penalty to the SFT
   model) on the reward model's score. The oracle is the rule kind with three functions: `exact` and `closeness`
   with weight 0 and `reward_model_score` (this file: the trained model, scoring in-process exactly as
   `--oracle.kind reward_model` does) with weight 1. So the policy is trained on the model's score only, while
   every iteration also logs the rules' rewards of the same samples (`reward/closeness`, `reward/exact`), and the
   held-out greedy accuracy is the exact rule's (the first function is the verifier).

Writes OUT.json (settings, the reward model's held-out accuracy, per-iteration curves, first/last-window means)
and OUT.png (the reward-model score and the rule reward of the training samples, and held-out accuracy, per
iteration).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

REWARD_MODEL_ENV = "WINNOW_RLHF_REWARD_MODEL"
"""the trained reward model's directory, for `reward_model_score` (the oracle loads this file by path)"""

_scorer = None


def reward_model_score(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The trained reward model's score of each (prompt, completion), loaded once per process."""
    global _scorer
    if _scorer is None:
        from winnow.oracles.reward_model import RewardModelOracle

        _scorer = RewardModelOracle.from_pretrained(os.environ[REWARD_MODEL_ENV], max_length=32, batch_size=256)
    return _scorer.scores(prompts, completions)


FULL = {"sft_steps": 250, "rm_steps": 400, "rm_lr": 3e-4, "rm_pairs_per_prompt": 3, "ppo_iterations": 60,
        "kl_coef": 0.05, "prompts_per_iteration": 64, "eval_every": 10, "eval_prompts": 200, "window": 10}
FAST = {"sft_steps": 250, "rm_steps": 150, "rm_lr": 3e-4, "rm_pairs_per_prompt": 1, "ppo_iterations": 20,
        "kl_coef": 0.05, "prompts_per_iteration": 64, "eval_every": 0, "eval_prompts": 100, "window": 5}


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A plausible mistake: off by 1-10, either way, never negative."""
    offset = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) * rng.choice([-1, 1])
    return answer + offset if answer + offset >= 0 else answer - offset


def write_pairs(out: Path, split: str, per_prompt: int, seed: int) -> Path:
    """{prompt, chosen, rejected} rows from the addition task's `split`: the right sum against a wrong one."""
    from winnow.data import make_task

    rng = random.Random(seed)
    rows = [{"prompt": q, "chosen": a, "rejected": str(wrong_answer(int(a), rng))}
            for q, a in make_task("arithmetic", seed=0).examples(split) for _ in range(per_prompt)]
    path = out / f"pairs_{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_reward_model_stage(out: Path, sft: Path, settings: dict, seed: int) -> Path:
    from winnow.data import DataConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.recipes.rm import RewardModelTrainConfig, train_reward_model
    from winnow.setup import ModelConfig

    train = write_pairs(out, "train", settings["rm_pairs_per_prompt"], seed)
    held_out = write_pairs(out, "eval", 1, seed + 1)
    return train_reward_model(RewardModelTrainConfig(
        model=ModelConfig(path=str(sft)), data=DataConfig(train=str(train), eval=str(held_out), answer_column=None),
        learner=LearnerConfig(lr=settings["rm_lr"], warmup_steps=10, micro_batch_size=128),
        logging=LoggingConfig(progress=False),
        batch_size=64, num_steps=settings["rm_steps"], max_length=32, eval_every=max(settings["rm_steps"] // 4, 1),
        max_eval_pairs=500, seed=seed, device="cpu", num_threads=1, output_dir=str(out), run_name="rm",
        overwrite=True))


def ppo_stage(out: Path, sft: Path, reward_model: Path, settings: dict, seed: int) -> Path:
    from winnow.algorithms import PPO
    from winnow.data import DataConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.loops.config import EvalConfig, RolloutConfig
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.recipes.rl import TrainConfig, train
    from winnow.setup import ModelConfig

    os.environ[REWARD_MODEL_ENV] = str(reward_model)
    rewards = RuleOracleConfig(rewards=["exact", "closeness", f"{Path(__file__).resolve()}:reward_model_score"],
                               reward_weights=[0.0, 0.0, 1.0])
    return train(TrainConfig(
        algo=PPO(critic_lr=3e-4, kl_coef=settings["kl_coef"]), model=ModelConfig(path=str(sft)),
        data=DataConfig(train="arithmetic", max_eval_prompts=settings["eval_prompts"]), oracle=OracleConfig(rule=rewards),
        rollout=RolloutConfig(prompts_per_iteration=settings["prompts_per_iteration"], num_samples=1, max_tokens=8),
        learner=LearnerConfig(lr=3e-5, micro_batch_size=256),
        eval=EvalConfig(every=settings["eval_every"], k=0, max_prompts=settings["eval_prompts"]),
        logging=LoggingConfig(progress=False), num_iterations=settings["ppo_iterations"], seed=seed, device="cpu",
        num_threads=1, output_dir=str(out), run_name="ppo", overwrite=True, save_final=False))


def report(rm_run: Path, ppo_run: Path, settings: dict) -> dict:
    """The curves and their first/last-window means, from the runs' metrics."""
    from winnow.logging import read_metrics

    rm_evals = [r for r in read_metrics(rm_run) if "eval/pair_accuracy" in r]
    rows = [r for r in read_metrics(ppo_run) if "reward/reward_model_score" in r]
    curves = {"iteration": [r["step"] for r in rows],
              "reward_model_score": [r["reward/reward_model_score"] for r in rows],
              "closeness": [r["reward/closeness"] for r in rows], "exact": [r["reward/exact"] for r in rows]}
    evals = [(r["step"], r["eval/greedy_accuracy"]) for r in read_metrics(ppo_run) if "eval/greedy_accuracy" in r]
    w = settings["window"]
    summary = {key: {"first": statistics.fmean(curves[key][:w]), "last": statistics.fmean(curves[key][-w:])}
               for key in ("reward_model_score", "closeness", "exact")}
    return {"reward_model": {"held_out_pair_accuracy": [(r["step"], r["eval/pair_accuracy"]) for r in rm_evals],
                             "held_out_margin_last": rm_evals[-1]["eval/reward_margin"]},
            "ppo": {"curves": curves, "held_out_greedy_accuracy": evals,
                    f"mean_of_first_and_last_{w}_iterations": summary}}


def rolling_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(result: dict, path: Path) -> None:
    """Each curve per iteration (thin) and its rolling mean over the report's window (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, w = result["ppo"]["curves"], result["settings"]["window"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, color in ((left, "reward_model_score", "tab:blue"), (middle, "closeness", "tab:orange"),
                           (right, "exact", "tab:red")):
        ax.plot(curves["iteration"], curves[key], color=color, alpha=0.3, linewidth=0.8)
        ax.plot(curves["iteration"], rolling_mean(curves[key], w), color=color, linewidth=2)
    left.set(title="reward-model score (trained on)", xlabel="PPO iteration", ylabel="mean over samples")
    middle.set(title="closeness rule (never trained on)", xlabel="PPO iteration", ylabel="-min(|y - sum|, 10)")
    right.plot([], [], color="tab:red", label=f"samples ({w}-iteration mean)")
    if result["ppo"]["held_out_greedy_accuracy"]:
        steps, accuracy = zip(*result["ppo"]["held_out_greedy_accuracy"])
        right.plot(steps, accuracy, "o-", color="tab:green", label="held-out, greedy")
    right.set(title="exact rule (never trained on)", xlabel="PPO iteration", ylabel="exact-match rate")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def run(out: Path, settings: dict, seed: int = 0) -> dict:
    from winnow.quickstart import QuickstartConfig, warm_start

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sft = out / "sft" / "final"
    if not sft.exists():  # the warm start is deterministic per seed: a rerun into the same --work reuses it
        sft = warm_start(QuickstartConfig(output_dir=str(out), sft_steps=settings["sft_steps"], seed=seed,
                                          progress=False, num_threads=1, overwrite=True))
    rm_run = train_reward_model_stage(out, sft, settings, seed)
    print(f"[rlhf] reward model trained: {rm_run}")
    ppo_run = ppo_stage(out, sft, rm_run / "final", settings, seed)
    return {"settings": settings, "seed": seed, **report(rm_run, ppo_run, settings),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/rlhf_cpu", help="OUT.json and OUT.png")
    parser.add_argument("--work", default="runs/rlhf_cpu", help="the runs' directories (SFT, reward model, PPO)")
    parser.add_argument("--fast", action="store_true", help="the test's short settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(Path(args.work), FAST if args.fast else FULL, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"reward_model": result["reward_model"], "summary": result["ppo"][
        f"mean_of_first_and_last_{result['settings']['window']}_iterations"]}, indent=1))


if __name__ == "__main__":
    main()
