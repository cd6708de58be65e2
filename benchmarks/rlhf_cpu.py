"""Classic RLHF end to end on CPU: SFT -> comparisons of the SFT model's samples -> reward model -> PPO against
the reward model served by Mosec, and whether the policy's reward-model score and the task's true rule reward
both rise.

    PYTHONPATH=$PWD python benchmarks/rlhf_cpu.py --out benchmarks/results/rlhf_cpu     # 8-11 min on 2 cores
    PYTHONPATH=$PWD python benchmarks/rlhf_cpu.py --fast --out /tmp/rlhf_fast            # the test's settings

1. SFT: the quickstart's warm start (the tiny model on 2-digit addition, `winnow.quickstart.warm_start`,
   `sft_steps`), the policy PPO starts from and the reference of its KL penalty.
2. Comparisons, as classic RLHF collects them: the SFT model samples `samples_per_prompt` responses to each prompt
   of the task's train split (temperature 1, wider than PPO's, so the pairs hold the mistakes the policy may drift
   to), and the rule labels them as a human labeller would: up to `wrong_per_prompt` distinct wrong samples
   (rejected) each against a right answer (chosen: a right sample, else the reference, the labeller's own). Then
   `near_misses_per_prompt` pairs of the right answer against one off by 1-10, *either way*: the policy's own
   mistakes are mostly too large (a carry added twice), and a model trained on those alone learns "smaller is
   better", which PPO then exploits. The eval split's prompts give the held-out pairs from the policy's samples
   alone, so the held-out pair accuracy is the model's accuracy on the policy's own mistakes.
3. Reward model: `winnow train rm` (`train_reward_model`) on those pairs, its backbone an SFT model of the same
   architecture trained longer (`rm_init_sft_steps`): a judge that adds better than the policy it judges.
4. PPO (`winnow train ppo`, one sample per prompt at `temperature`, the critic as the only baseline, a k1 KL
   penalty to the SFT model) with `--oracle.kind remote` against `winnow serve-oracle --oracle.kind reward_model`
   (Mosec, one worker on 127.0.0.1, a free port; stopped after). `--gold-rewards exact closeness` scores the same
   samples by the task's rules, never trained on, and judges the held-out greedy accuracy. `--in-process` scores
   with the model in the PPO process instead (`--oracle.kind reward_model`).

Writes OUT.json (settings, the reward model's held-out accuracy, per-iteration curves, first/last-window means)
and OUT.png (the reward-model score, the rules' rewards of the training samples and held-out accuracy, per
iteration).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"sft_steps": 250, "rm_init_sft_steps": 1000, "comparison_prompts": None, "samples_per_prompt": 4,
        "wrong_per_prompt": 2, "near_misses_per_prompt": 3, "rm_steps": 600, "rm_lr": 3e-4, "ppo_iterations": 60,
        "temperature": 0.5, "kl_coef": 0.3, "ppo_lr": 5e-6, "num_mini_batches": 4, "prompts_per_iteration": 64,
        "eval_every": 10, "eval_prompts": 200, "window": 10}
FAST = {**FULL, "rm_init_sft_steps": 250, "comparison_prompts": 1000, "samples_per_prompt": 2, "rm_steps": 300,
        "ppo_iterations": 40, "temperature": 1.0, "kl_coef": 0.05, "ppo_lr": 3e-5, "num_mini_batches": 1,
        "eval_every": 0, "eval_prompts": 100, "window": 10}
"""the test's: the policy's SFT model as the reward model's backbone, fewer comparisons and steps, and PPO pushed
harder (temperature 1, 6x the learning rate, a sixth of the KL) so that 40 iterations move the model's score"""
HELD_OUT_SAMPLES_PER_PROMPT = 4
"""samples per eval-split prompt for the held-out pairs (one wrong sample each makes a pair)"""
MAX_LENGTH = 32
"""tokens of a (prompt, response) pair the reward model reads: an addition prompt and an 8-token answer fit"""


def policy_comparisons(sft: Path, split: str, samples_per_prompt: int, wrong_per_prompt: int, seed: int,
                       max_prompts: int | None = None) -> tuple[list[dict], dict]:
    """{prompt, chosen, rejected} rows from the SFT model's samples on `split` (its first `max_prompts`), labelled
    by the exact rule: up to `wrong_per_prompt` distinct wrong samples each against a right answer (a right sample,
    else the reference). Empty samples make no pair (a reward model reads text). Also the counts (prompts, samples,
    right samples)."""
    from winnow.data import DataConfig, load_prompts
    from winnow.engines import make_engine
    from winnow.setup import ModelConfig, load_policy
    from winnow.types import SamplingParams

    model, tokenizer = load_policy(ModelConfig(path=str(sft)))
    prompts = load_prompts(DataConfig(train="arithmetic"), tokenizer, split)[:max_prompts]
    engine = make_engine("hf", model, tokenizer, device="cpu", copy_model=False)
    params = SamplingParams(temperature=1.0, max_tokens=8, n=samples_per_prompt, seed=seed)
    completions = engine.generate([p.token_ids for p in prompts], params)
    rows, num_right = [], 0
    for i, prompt in enumerate(prompts):
        texts = [c.text for c in completions[i * samples_per_prompt:(i + 1) * samples_per_prompt]]
        right = [t for t in texts if t.strip() == prompt.reference]
        num_right += len(right)
        wrong = dict.fromkeys(t for t in texts if t.strip() and t.strip() != prompt.reference)
        rows += [{"prompt": prompt.text, "chosen": right[0] if right else prompt.reference, "rejected": w}
                 for w in list(wrong)[:wrong_per_prompt]]
    return rows, {"prompts": len(prompts), "samples": len(completions), "right_samples": num_right}


def near_misses(per_prompt: int, seed: int) -> list[dict]:
    """{prompt, chosen, rejected} rows of the train split: the right sum against one off by 1-10, either way."""
    from winnow.data import make_task

    rng = random.Random(seed)
    rows = []
    for question, answer in make_task("arithmetic", seed=0).examples("train"):
        for _ in range(per_prompt):
            offset = rng.randint(1, 10) * rng.choice([-1, 1])
            wrong = int(answer) + offset if int(answer) + offset >= 0 else int(answer) - offset
            rows.append({"prompt": question, "chosen": answer, "rejected": str(wrong)})
    return rows


def write_comparisons(out: Path, sft: Path, settings: dict, seed: int) -> tuple[Path, Path, dict]:
    """The reward model's train pairs (the policy's comparisons and the near misses, shuffled) and held-out pairs
    (the policy's comparisons on the eval split), as .jsonl; and their counts."""
    policy_rows, policy_counts = policy_comparisons(sft, "train", settings["samples_per_prompt"],
                                                    settings["wrong_per_prompt"], seed, settings["comparison_prompts"])
    train = policy_rows + near_misses(settings["near_misses_per_prompt"], seed)
    random.Random(seed).shuffle(train)
    held_out, held_out_counts = policy_comparisons(sft, "eval", HELD_OUT_SAMPLES_PER_PROMPT, 1, seed + 1)
    counts = {"train": {**policy_counts, "policy_pairs": len(policy_rows), "pairs": len(train)},
              "held_out": {**held_out_counts, "pairs": len(held_out)}}
    print(f"[rlhf] comparisons: {counts}")
    paths = out / "comparisons_train.jsonl", out / "comparisons_eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return *paths, counts


def train_reward_model_stage(out: Path, backbone: Path, train: Path, held_out: Path, settings: dict, seed: int) -> Path:
    from winnow.data import DataConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.recipes.rm import RewardModelTrainConfig, train_reward_model
    from winnow.setup import ModelConfig

    return train_reward_model(RewardModelTrainConfig(
        model=ModelConfig(path=str(backbone)),
        data=DataConfig(train=str(train), eval=str(held_out), answer_column=None),
        learner=LearnerConfig(lr=settings["rm_lr"], warmup_steps=10, micro_batch_size=128),
        logging=LoggingConfig(progress=False),
        batch_size=64, num_steps=settings["rm_steps"], max_length=MAX_LENGTH,
        eval_every=max(settings["rm_steps"] // 4, 1), max_eval_pairs=500, seed=seed, device="cpu", num_threads=1,
        output_dir=str(out), run_name="rm", overwrite=True))


def free_port() -> int:
    """A port nothing listens on now, with the one above it free too (the service's GET /health)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


@contextlib.contextmanager
def served_reward_model(reward_model: Path, work: Path, start_timeout_s: float = 300.0):
    """`winnow serve-oracle --oracle.kind reward_model` for `reward_model` on 127.0.0.1 (one CPU worker); yields
    its URL once it answers a health check, and stops it (its whole process group) on leaving."""
    from winnow.oracles.remote import OracleUnavailableError, RemoteOracle

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "MOSEC_PATH": tempfile.mkdtemp(prefix="mosec-"), "OMP_NUM_THREADS": "1", "WINNOW_ORACLE_TOKEN": ""}
    log_path = work / "serve-oracle.log"
    command = [sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.kind", "reward_model",
               "--oracle.reward-model.path", str(reward_model), "--oracle.reward-model.max-length", str(MAX_LENGTH),
               "--port", str(port), "--num-workers", "1", "--max-wait-ms", "2", "--log-level", "warning"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(RemoteOracle(url, timeout_s=5), server, log_path, time.monotonic() + start_timeout_s,
                            OracleUnavailableError)
        print(f"[rlhf] reward model served at {url}")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_healthy(client, server: subprocess.Popen, log_path: Path, deadline: float, unavailable) -> None:
    try:
        while True:
            try:
                client.health()
                return
            except unavailable:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"winnow serve-oracle did not start; its log ({log_path}):\n"
                                       + log_path.read_text()[-3000:]) from None
                time.sleep(0.5)
    finally:
        client.close()


def ppo_stage(out: Path, sft: Path, oracle, settings: dict, seed: int) -> Path:
    """`winnow train ppo` on `oracle`'s rewards, the task's rules as the gold rewards beside them."""
    from winnow.algorithms import PPO
    from winnow.data import DataConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.loops.config import EvalConfig, RolloutConfig
    from winnow.recipes.rl import TrainConfig, train
    from winnow.setup import ModelConfig

    return train(TrainConfig(
        algo=PPO(critic_lr=3e-4, kl_coef=settings["kl_coef"]), model=ModelConfig(path=str(sft)),
        data=DataConfig(train="arithmetic", max_eval_prompts=settings["eval_prompts"]), oracle=oracle,
        gold_rewards=["exact", "closeness"],
        rollout=RolloutConfig(prompts_per_iteration=settings["prompts_per_iteration"], num_samples=1, max_tokens=8,
                              temperature=settings["temperature"]),
        learner=LearnerConfig(lr=settings["ppo_lr"], num_mini_batches=settings["num_mini_batches"],
                              micro_batch_size=256),
        eval=EvalConfig(every=settings["eval_every"], k=0, max_prompts=settings["eval_prompts"]),
        logging=LoggingConfig(progress=False), num_iterations=settings["ppo_iterations"], seed=seed, device="cpu",
        num_threads=1, output_dir=str(out), run_name="ppo", overwrite=True, save_final=False))


def served_oracle(url: str):
    from winnow.oracles import OracleConfig, RemoteOracleConfig

    return OracleConfig(kind="remote", remote=RemoteOracleConfig(url=url))


def in_process_oracle(reward_model: Path):
    from winnow.oracles import OracleConfig, RewardModelOracleConfig

    return OracleConfig(kind="reward_model",
                        reward_model=RewardModelOracleConfig(path=str(reward_model), max_length=MAX_LENGTH,
                                                             batch_size=256))


def report(rm_run: Path, ppo_run: Path, settings: dict) -> dict:
    """The curves and their first/last-window means, from the runs' metrics."""
    from winnow.logging import read_metrics

    rm_evals = [r for r in read_metrics(rm_run) if "eval/pair_accuracy" in r]
    rows = [r for r in read_metrics(ppo_run) if "reward/mean" in r]
    curves = {"iteration": [r["step"] for r in rows], "reward_model_score": [r["reward/mean"] for r in rows],
              "closeness": [r["gold/closeness"] for r in rows], "exact": [r["gold/exact"] for r in rows],
              "oracle_pair_accuracy": [r.get("gold/oracle_pair_accuracy") for r in rows]}
    evals = [(r["step"], r["eval/greedy_accuracy"]) for r in read_metrics(ppo_run) if "eval/greedy_accuracy" in r]
    w = settings["window"]
    summary = {key: {"first": _mean(curves[key][:w]), "last": _mean(curves[key][-w:])}
               for key in ("reward_model_score", "closeness", "exact", "oracle_pair_accuracy")}
    return {"reward_model": {"held_out_pair_accuracy": [(r["step"], r["eval/pair_accuracy"]) for r in rm_evals],
                             "held_out_margin_last": rm_evals[-1]["eval/reward_margin"]},
            "ppo": {"curves": curves, "held_out_greedy_accuracy": evals,
                    f"mean_of_first_and_last_{w}_iterations": summary}}


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values present (an iteration whose samples the gold verifier all scored alike has no
    pair accuracy); None when none is."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def rolling_mean(values: list[float | None], window: int) -> list[float | None]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    return [_mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(result: dict, path: Path) -> None:
    """Each curve per iteration (thin) and its rolling mean over the report's window (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, w = result["ppo"]["curves"], result["settings"]["window"]
    fig, (left, middle, right, agreement) = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, color in ((left, "reward_model_score", "tab:blue"), (middle, "closeness", "tab:orange"),
                           (right, "exact", "tab:red"), (agreement, "oracle_pair_accuracy", "tab:purple")):
        values = [float("nan") if v is None else v for v in curves[key]]
        ax.plot(curves["iteration"], values, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(curves["iteration"], rolling_mean(curves[key], w), color=color, linewidth=2)
    agreement.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    agreement.set(title="reward model vs exact rule, on the samples", xlabel="PPO iteration",
                  ylabel="pair accuracy (0.5: chance)")
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


def sft_stage(out: Path, steps: int, seed: int) -> Path:
    """The quickstart's warm start into `out` (reused when a rerun finds it: it is deterministic per seed)."""
    from winnow.quickstart import QuickstartConfig, warm_start

    final = out / "sft" / "final"
    if final.exists():
        return final
    return warm_start(QuickstartConfig(output_dir=str(out), sft_steps=steps, seed=seed, progress=False,
                                       num_threads=1, overwrite=True))


def run(out: Path, settings: dict, seed: int = 0, in_process: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sft = sft_stage(out, settings["sft_steps"], seed)
    backbone = (sft if settings["rm_init_sft_steps"] == settings["sft_steps"]
                else sft_stage(out / "rm_init", settings["rm_init_sft_steps"], seed))
    train_pairs, held_out, counts = write_comparisons(out, sft, settings, seed)
    rm_run = train_reward_model_stage(out, backbone, train_pairs, held_out, settings, seed)
    reward_model = rm_run / "final"
    print(f"[rlhf] reward model trained: {reward_model}")
    if in_process:
        ppo_run = ppo_stage(out, sft, in_process_oracle(reward_model), settings, seed)
    else:
        with served_reward_model(reward_model, out) as url:
            ppo_run = ppo_stage(out, sft, served_oracle(url), settings, seed)
    return {"settings": settings, "seed": seed, "reward_model_served": not in_process, "comparisons": counts,
            **report(rm_run, ppo_run, settings), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/rlhf_cpu", help="OUT.json and OUT.png")
    parser.add_argument("--work", default="runs/rlhf_cpu", help="the runs' directories (SFT, reward model, PPO)")
    parser.add_argument("--fast", action="store_true", help="the test's short settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="score PPO's samples with the reward model in the PPO process, not served by Mosec")
    args = parser.parse_args()
    result = run(Path(args.work), FAST if args.fast else FULL, args.seed, args.in_process)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"reward_model": result["reward_model"], "summary": result["ppo"][
        f"mean_of_first_and_last_{result['settings']['window']}_iterations"]}, indent=1))


if __name__ == "__main__":
    main()
