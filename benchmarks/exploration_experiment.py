"""Does active exploration pay? Win rate against oracle queries, passive online DPO against SEA, XPO and APL.

The task is the built-in preference task (`arithmetic-pref`: 2-digit addition, the `closeness` rule as the
oracle, win rate against a reference answer that is off by one), from an SFT warm start of the tiny model (as
the quickstart makes it). Per seed, every arm starts from the *same* SFT model and sees the *same* prompt
order (the preference recipe draws batches with the run's seed). Each arm runs up to the same budget of
pairwise oracle comparisons (`counts/oracle_queries`) and is evaluated every few iterations on the same
held-out prompts (their queries are counted apart and not in the budget).

The success criterion is written into the results before any run starts (`CRITERION`).

`--task rare` runs the same arms on `arithmetic-pref-rare` instead: 3-digit addition from a short SFT warm start
(`--sft-steps`, default 500 there) judged by the `exact` rule, so that a prompt's right answers are rare among its
samples and a random pair is usually two wrong answers, a tie that teaches nothing. That is where choosing which
pair to ask about should pay, if anywhere. An iteration whose pairs all tie is a cost of the task there, not a
fault: the runs do not stop on idle iterations (150 SFT steps were tried first: 0.5% greedy accuracy, 99% of
queries tied, and the runs stopped within 5-13 iterations). A fixed number of SFT steps gives warm starts of
very different accuracy from seed to seed (500 steps: 3%, 4% and 83%), so `--sft-accuracy-band 0.10 0.20`
controls it instead: per seed, SFT is evaluated every `--sft-eval-every` steps on the first 200 held-out prompts
and stops at the first evaluation whose greedy accuracy is in the band (`pick_warm_start`); the chosen step and
accuracy of each seed are written into the results (`warm_starts`).

Usage (a pilot on 2 cores; the full run needs ~16 cores: every run is one process with one thread):

    PYTHONPATH=$PWD python benchmarks/exploration_experiment.py --arms random sea-bai --seeds 0 1 \\
        --budget 1280 --eval-prompts 200 --workers 2 --out benchmarks/results/exploration_pilot

    # the full experiment of issue 14
    PYTHONPATH=$PWD python benchmarks/exploration_experiment.py --full --workers 16

Writes OUT.json (the criterion, the settings, every run's curve and summary, the per-arm table and the
criterion's verdict) and OUT.png (mean win rate against oracle queries, with a 95% bootstrap band per arm).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

CRITERION = (
    "Decided before running: SEA reproduces the sample-efficiency claim on this task if, for sea-ee or sea-bai, "
    "the median over seeds of (oracle queries to reach start + 0.20 win rate) / (the same for random, on the "
    "same seed) is at most 0.67 and the bootstrap 95% interval of that median lies below 1. A run that never "
    "reaches the target within the budget counts as reaching it at 2 x budget (censored; reported as such)."
)

MIN_SEEDS = 5
"""the criterion is evaluated only with at least this many paired seeds (the full run has 10)"""

FULL_ARMS = {  # arm -> seeds, as issue 14 asks
    "random": 10, "sea-ee": 10, "sea-bai": 10, "sea-greedy": 10,
    "sea-uncertainty": 5, "sea-mixed": 5, "xpo": 5, "apl": 5, "sea-bai-policy": 5, "random-n20": 5,
    "sea-bai-n20": 5,
}


@dataclass
class Arm:
    """One method: the objective, the pair selection and its settings."""

    algo: str = "dpo"
    selection: str = "random"
    num_samples: int = 8
    sea: dict = field(default_factory=dict)
    apl: dict = field(default_factory=dict)
    oracle_fraction: float = 1.0
    """the share of each iteration's prompts sent to the oracle (to size the run to the budget)"""


def make_arm(name: str) -> Arm:
    n20 = name.endswith("-n20")
    base = name[:-4] if n20 else name
    arm = {
        "random": Arm(),
        "sea-ee": Arm(selection="sea-ee", sea={"features": "arithmetic"}),
        "sea-bai": Arm(selection="sea-bai", sea={"features": "arithmetic"}),
        "sea-greedy": Arm(selection="sea-greedy", sea={"features": "arithmetic"}),
        "sea-uncertainty": Arm(selection="sea-uncertainty", sea={"features": "arithmetic"}),
        "sea-passive": Arm(selection="sea-passive", sea={"features": "arithmetic"}),
        "sea-mixed": Arm(selection="sea-bai", sea={"features": "arithmetic", "mixed": True}, oracle_fraction=0.7),
        "sea-bai-policy": Arm(selection="sea-bai", sea={"features": "policy"}),
        "xpo": Arm(algo="xpo", selection="xpo", num_samples=2),
        "apl": Arm(selection="apl", apl={"keep_fraction": 0.5}, oracle_fraction=0.5),
    }.get(base)
    if arm is None:
        raise SystemExit(f"unknown arm {name!r}: choose from {', '.join(FULL_ARMS)} (and sea-passive)")
    if n20:
        arm.num_samples = 20
    return arm


# ---------------------------------------------------------------------- one run (a worker process)


TASKS = {  # --task -> (the preference task, the SFT warm start's task, the oracle's rule, default SFT steps)
    "pref": ("arithmetic-pref", "arithmetic", None, 250),
    "rare": ("arithmetic-pref-rare", "arithmetic-3digit", "exact", 500),
}


def sft_model(out: Path, seed: int, steps: int, task_name: str = "arithmetic") -> Path:
    """The SFT warm start of `seed` on `task_name` (built once, shared by every arm of that seed)."""
    from winnow.data import DataConfig, make_task
    from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.loops.config import EvalConfig
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.recipes.sft import SFTConfig, train_sft
    from winnow.setup import ModelConfig

    name = f"sft_seed{seed}" if task_name == "arithmetic" else f"sft_{task_name}_{steps}_seed{seed}"
    final = out / name / "final"
    if final.exists():
        return final
    task = make_task(task_name, seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    init = save_tiny(build_tiny_model(tokenizer, seed=seed), tokenizer, out / f"init_{name}")
    run = train_sft(SFTConfig(
        model=ModelConfig(path=str(init)), data=DataConfig(train=task_name), oracle=OracleConfig(rule=RuleOracleConfig(rewards=["exact"])),
        logging=LoggingConfig(progress=False), learner=LearnerConfig(lr=1e-3, warmup_steps=10, micro_batch_size=128),
        eval=EvalConfig(every=0, k=0, max_prompts=200), batch_size=128, num_steps=steps, max_tokens=8,
        run_name=name, seed=seed, device="cpu", output_dir=str(out), num_threads=1))
    return run / "final"


def pick_warm_start(evaluations: list[tuple[int, float]], band: tuple[float, float], is_last: bool) -> dict | None:
    """The SFT step to start from, given the held-out greedy accuracy at each evaluation so far, in order: the first
    inside `band` (inclusive). Once an evaluation overshoots the band, or at the last one, the nearer to the band of
    the last two (only those two checkpoints are kept), marked out of band. None: train on."""
    step, accuracy = evaluations[-1]
    low, high = band
    if low <= accuracy <= high:
        return {"step": step, "accuracy": accuracy, "in_band": True}
    if accuracy < low and not is_last:
        return None
    step, accuracy = min(evaluations[-2:], key=lambda e: max(low - e[1], e[1] - high))  # ties: the earlier
    return {"step": step, "accuracy": accuracy, "in_band": False}


def band_run_name(task_name: str, band: tuple[float, float], every: int, seed: int) -> str:
    return f"sft_{task_name}_band{band[0]:g}-{band[1]:g}_every{every}_seed{seed}"


def sft_model_in_band(out: Path, seed: int, task_name: str, band: tuple[float, float], every: int,
                      max_steps: int) -> tuple[Path, dict]:
    """The SFT warm start of `seed` whose held-out greedy accuracy lies in `band`: SFT evaluated every `every`
    steps (on the task's first 200 held-out prompts), stopped at the first evaluation inside the band
    (`pick_warm_start`). Returns the model's path and the choice (step, accuracy, every evaluation)."""
    import torch

    from winnow.data import DataConfig, make_task
    from winnow.data.tiny import build_tiny_model, load_tiny, save_tiny, train_char_tokenizer
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.checkpoint import CheckpointConfig, latest_checkpoint
    from winnow.loops.config import EvalConfig
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.recipes.sft import SFTConfig, train_sft
    from winnow.setup import ModelConfig

    name = band_run_name(task_name, band, every, seed)
    run_dir, chosen = out / name, out / name / "warm_start"
    if (chosen / "choice.json").exists():
        return chosen, json.loads((chosen / "choice.json").read_text())
    task = make_task(task_name, seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    init = save_tiny(build_tiny_model(tokenizer, seed=seed), tokenizer, out / f"init_{name}")
    last = latest_checkpoint(run_dir)  # an interrupted search goes on from its last segment
    done = int(last.name.removeprefix("iter_")) if last else 0
    evaluations = [(r["step"], r["eval/greedy_accuracy"]) for r in (read_metrics(run_dir) if last else [])
                   if 0 < r["step"] <= done and "eval/greedy_accuracy" in r]
    choice = pick_warm_start(evaluations, band, is_last=done + every > max_steps) if evaluations else None
    for steps in range(done + every, max_steps + 1, every):
        if choice is not None:
            break
        # Each segment resumes the last one's checkpoint exactly (weights, AdamW state, data stream): one SFT run,
        # evaluated at its end. Only num_steps differs from the checkpoint's config, and under the constant
        # schedule (after 10 warm-up steps) it changes nothing the run computes, hence resume_force.
        train_sft(SFTConfig(
            model=ModelConfig(path=str(init)), data=DataConfig(train=task_name),
            oracle=OracleConfig(rule=RuleOracleConfig(rewards=["exact"])), logging=LoggingConfig(progress=False),
            learner=LearnerConfig(lr=1e-3, warmup_steps=10, micro_batch_size=128),
            eval=EvalConfig(every=0, k=0, max_prompts=200), batch_size=128, num_steps=steps, max_tokens=8,
            checkpoint=CheckpointConfig(every=every, keep=2), save_final=False,
            resume=str(run_dir) if evaluations else None, resume_force=True, overwrite=not evaluations,
            run_name=name, seed=seed, device="cpu", output_dir=str(out), num_threads=1))
        evaluations.append((steps, read_metrics(run_dir)[-1]["eval/greedy_accuracy"]))
        choice = pick_warm_start(evaluations, band, is_last=steps + every > max_steps)
    model, tokenizer = load_tiny(init)
    state = torch.load(run_dir / "checkpoints" / f"iter_{choice['step']:05d}" / "policy" / "checkpoint.pt",
                       map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    save_tiny(model, tokenizer, chosen)
    choice = {**choice, "seed": seed, "evaluations": evaluations}
    (chosen / "choice.json").write_text(json.dumps(choice))
    return chosen, choice


def run_arm(job: dict) -> dict:
    """Train one arm on one seed up to the budget; its win-rate curve against oracle queries and its numbers."""
    from winnow.algorithms import PREFERENCE_OBJECTIVES
    from winnow.data import DataConfig
    from winnow.exploration import APLConfig, SEAConfig
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig
    from winnow.loops.config import PairConfig, RolloutConfig, WinRateConfig
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.recipes.preference import PreferenceTrainConfig, train_preference
    from winnow.setup import ModelConfig

    arm, s = make_arm(job["arm"]), job["settings"]
    finished = Path(job["out"]) / run_name(job["arm"], job["seed"], s["reward"], s["task"]) / RESULT_FILE
    if job.get("reuse_finished") and finished.exists():
        return json.loads(finished.read_text())
    per_iteration = s["prompts"] * arm.oracle_fraction
    num_iterations = math.ceil(s["budget"] / per_iteration) + (10 if arm.sea.get("mixed") else 0)
    config = PreferenceTrainConfig(
        algo=PREFERENCE_OBJECTIVES[arm.algo](), model=ModelConfig(path=job["model"]), device="cpu",
        seed=job["seed"], num_threads=1,
        data=DataConfig(train=s["task"], max_eval_prompts=s["eval_prompts"]),
        oracle=OracleConfig(rule=RuleOracleConfig(rewards=[s["reward"]])),
        rollout=RolloutConfig(prompts_per_iteration=s["prompts"], num_samples=arm.num_samples, max_tokens=8,
                              max_idle_iterations=num_iterations + 1 if s["task"] != "arithmetic-pref" else 5),
        pairs=PairConfig(selection=arm.selection, sea=SEAConfig(**arm.sea), apl=APLConfig(**arm.apl)),
        learner=LearnerConfig(lr=s["lr"]), eval=WinRateConfig(every=s["eval_every"], max_prompts=s["eval_prompts"]),
        num_iterations=num_iterations, logging=LoggingConfig(progress=False),
        output_dir=job["out"], run_name=run_name(job["arm"], job["seed"], s["reward"], s["task"]))
    shutil.rmtree(Path(job["out"]) / config.run_name, ignore_errors=True)  # a rerun starts a fresh log
    start = time.perf_counter()
    train_preference(config)
    run_dir = Path(job["out"]) / config.run_name
    result = {**collect(run_dir, s["budget"]), "arm": job["arm"], "seed": job["seed"],
              "wall_s": time.perf_counter() - start}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, allow_nan=False))  # --report-only reads it back
    return result


RESULT_FILE = "experiment_result.json"
"""a finished run's curve, numbers and wall time, in its run directory"""


def finished_run(work: Path, arm: str, seed: int, settings: dict) -> dict:
    """A finished run's result from its run directory: the one it wrote, or else rebuilt from its metrics (without
    its wall time)."""
    run_dir = work / run_name(arm, seed, settings["reward"], settings["task"])
    if (run_dir / RESULT_FILE).exists():
        return json.loads((run_dir / RESULT_FILE).read_text())
    return {**collect(run_dir, settings["budget"]), "arm": arm, "seed": seed}


def run_name(arm: str, seed: int, reward: str, task: str = "arithmetic-pref") -> str:
    """The run directory's name (the reward in it unless it is the default closeness rule, the task unless it is
    the built-in preference task)."""
    name = f"{arm}_seed{seed}" if reward == "closeness" else f"{arm}_{reward}_seed{seed}"
    return name if task == "arithmetic-pref" else f"{task}_{name}"


def collect(run_dir: Path, budget: float) -> dict:
    """One run's curve (win rate against oracle queries) and numbers, from its metrics (its last start only)."""
    from winnow.logging import read_metrics

    rows = read_metrics(run_dir)
    starts = [k for k, r in enumerate(rows) if r.get("step") == 0]
    rows = rows[starts[-1]:] if starts else rows
    curve = [(r.get("counts/oracle_queries", 0.0), r["eval/win_rate"]) for r in rows if "eval/win_rate" in r]
    last = rows[-1]
    tied = last.get("counts/tied_pairs", 0.0) / max(last.get("counts/oracle_queries", 0.0), 1.0)
    iteration_times = [r["time/iteration"] for r in rows if r.get("step", 0) > 0 and "time/iteration" in r]
    return {"curve": curve, "tied_fraction": tied,
            "seconds_per_iteration": statistics.median(iteration_times) if iteration_times else None,
            "rm_accuracy_last10": _mean_finite([r.get("sea/rm_accuracy") for r in rows[-10:]]),
            **summarise(curve, budget)}


def _mean_finite(values: list) -> float | None:
    """The mean of the finite numbers in `values` (None when there are none, e.g. no reward model)."""
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def summarise(curve: list[tuple[float, float]], budget: float) -> dict:
    """Queries to start+0.20 / +0.30 (None: not reached), normalised area under the curve, final win rate."""
    curve = [(q, w) for q, w in curve if q <= budget]
    start = curve[0][1]

    def queries_to(target: float) -> float | None:
        return next((q for q, w in curve if w >= target), None)

    area = sum((q1 - q0) * (w0 + w1) / 2 for (q0, w0), (q1, w1) in zip(curve, curve[1:]))
    span = curve[-1][0] - curve[0][0]
    return {"start": start, "final": curve[-1][1], "queries_to_+0.20": queries_to(start + 0.20),
            "queries_to_+0.30": queries_to(start + 0.30), "auc": area / span if span else start}


# ---------------------------------------------------------------------- statistics and the report


def bootstrap(values: list[float], stat=statistics.median, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of `stat`."""
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def verdict(runs: list[dict], budget: float) -> dict:
    """The pre-registered criterion, for sea-ee and sea-bai against random, paired by seed."""
    passive = {r["seed"]: r for r in runs if r["arm"] == "random"}
    out = {}
    for arm in ("sea-ee", "sea-bai"):
        ratios, censored = [], 0
        for r in runs:
            if r["arm"] != arm or r["seed"] not in passive:
                continue
            q, q0 = r["queries_to_+0.20"], passive[r["seed"]]["queries_to_+0.20"]
            censored += (q is None) + (q0 is None)
            ratios.append((q if q is not None else 2 * budget) / (q0 if q0 is not None else 2 * budget))
        if not ratios:
            continue
        low, high = bootstrap(ratios) if len(ratios) > 1 else (None, None)  # no interval from one seed
        median = statistics.median(ratios)
        out[arm] = {"ratios": ratios, "median": median, "ci95": [low, high], "censored_runs": censored,
                    "reproduces": bool(median <= 0.67 and high is not None and high < 1)}
        if len(ratios) < MIN_SEEDS:  # a bootstrap of a handful of seeds is not an interval worth a verdict
            out[arm].update(reproduces=None, note=f"{len(ratios)} seeds: fewer than {MIN_SEEDS}, not evaluated")
    return out


def paired(runs: list[dict]) -> dict:
    """Per arm, paired by seed against random: the mean of (arm - random) in final win rate and AUC, its bootstrap
    95% interval, and in how many seeds the arm was higher."""
    passive = {r["seed"]: r for r in runs if r["arm"] == "random"}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs if r["arm"] != "random"):
        rs = [r for r in runs if r["arm"] == arm and r["seed"] in passive]
        if not rs:
            continue
        row = {"seeds": len(rs)}
        for key in ("final", "auc"):
            diffs = [r[key] - passive[r["seed"]][key] for r in rs]
            row[f"{key}_minus_random_mean"] = statistics.fmean(diffs)
            row[f"{key}_minus_random_ci95"] = list(bootstrap(diffs, stat=statistics.fmean)) if len(diffs) > 1 else None
            row[f"{key}_higher_in"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        out[arm] = row
    return out


def table(runs: list[dict]) -> dict:
    """Per arm: means over seeds (None where a run did not reach the target is left out and counted)."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        row = {"seeds": len(rs)}
        for key in ("start", "final", "auc", "tied_fraction", "seconds_per_iteration", "queries_to_+0.20",
                    "queries_to_+0.30"):
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            if key.startswith("queries_to"):
                row[key + "_reached"] = f"{len(values)}/{len(rs)}"
        out[arm] = row
    return out


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in runs):
        curves = [r["curve"] for r in runs if r["arm"] == arm]
        length = min(len(c) for c in curves)
        xs = [statistics.fmean(c[i][0] for c in curves) for i in range(length)]
        ys = [[c[i][1] for c in curves] for i in range(length)]
        mean = [statistics.fmean(y) for y in ys]
        band = [bootstrap(y, stat=statistics.fmean) if len(y) > 1 else (m, m) for y, m in zip(ys, mean)]
        ax.plot(xs, mean, label=f"{arm} ({len(curves)} seeds)")
        ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], alpha=0.2)
    ax.set_xlabel("pairwise oracle queries (counts/oracle_queries)")
    ax.set_ylabel("win rate vs reference (greedy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def warm_starts(pool, seeds: list[int], work: Path, settings: dict, sft_task: str) -> dict[int, tuple[Path, dict | None]]:
    """seed -> (the SFT warm start, its choice when its accuracy is controlled, else None)."""
    band = settings.get("sft_accuracy_band")
    if band is None:
        paths = pool.starmap(sft_model, [(work, s, settings["sft_steps"], sft_task) for s in seeds])
        return {s: (p, None) for s, p in zip(seeds, paths)}
    args = [(work, s, sft_task, tuple(band), settings["sft_eval_every"], settings["sft_max_steps"]) for s in seeds]
    return dict(zip(seeds, pool.starmap(sft_model_in_band, args)))


def train_all(plan: dict, seeds: list[int], work: Path, settings: dict, args) -> tuple[list[dict], dict]:
    """The SFT start of every seed, then every (arm, seed) run, `args.workers` processes at a time. Returns the
    runs and, when the warm starts' accuracy is controlled, each seed's choice."""
    with mp.get_context("spawn").Pool(args.workers) as pool:
        starts = warm_starts(pool, seeds, work, settings, TASKS[args.task][1])
        jobs = [{"arm": arm, "seed": s, "model": str(starts[s][0]), "out": str(work), "settings": settings,
                 "reuse_finished": args.reuse_finished} for arm, ss in plan.items() for s in ss]
        runs = pool.map(run_arm, jobs, chunksize=1)  # in the plan's order: the first arms finish first
    return runs, {s: choice for s, (_, choice) in starts.items() if choice is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["random", "sea-bai"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--full", action="store_true", help="issue 14's arms and seeds (FULL_ARMS)")
    parser.add_argument("--budget", type=int, default=4800, help="oracle queries per run")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--eval-every", type=int, default=10, help="iterations between evaluations")
    parser.add_argument("--eval-prompts", type=int, default=1000, help="held-out prompts for the win rate")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--reward", default="closeness", choices=["closeness", "exact"],
                        help="the oracle's rule: closeness (graded: most random pairs carry a label) or exact "
                             "(only right beats wrong: informative pairs are rare, the case exploration is for)")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: 250 (pref), 500 (rare)")
    parser.add_argument("--sft-accuracy-band", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                        help="per seed, the SFT warm start whose held-out greedy accuracy is first in [LOW, HIGH] "
                             "(evaluated every --sft-eval-every steps up to --sft-max-steps; replaces --sft-steps)")
    parser.add_argument("--sft-eval-every", type=int, default=25)
    parser.add_argument("--sft-max-steps", type=int, default=2000)
    parser.add_argument("--task", choices=list(TASKS), default="pref",
                        help="pref: the built-in preference task; rare: arithmetic-pref-rare with the exact rule, "
                             "where right answers are rare among samples (module docstring)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--out", default="benchmarks/results/exploration", help="OUT.json and OUT.png")
    parser.add_argument("--work", default="runs/exploration",
                        help="run directories and SFT models (reused: an SFT model of a seed is built once)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild OUT.json and OUT.png from the run directories in --work, training nothing")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="a run whose directory in --work holds its result is not run again (to finish an "
                             "interrupted experiment)")
    parser.add_argument("--label", default="", help="a label written into the results and the plot's title (e.g. PILOT)")
    parser.add_argument("--note", default="", help="a longer note written into the results (e.g. how the scale was cut)")
    args = parser.parse_args()

    task, _, forced_reward, default_sft_steps = TASKS[args.task]
    if forced_reward:
        args.reward = forced_reward
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"workers": args.workers, "budget": args.budget, "prompts": args.prompts, "eval_every": args.eval_every,
                "eval_prompts": args.eval_prompts, "lr": args.lr,
                "sft_steps": args.sft_steps or default_sft_steps, "task": task, "reward": args.reward,
                "oracle": f"{args.reward} rule (Bradley-Terry on the two scores)"}
    if args.sft_accuracy_band:
        settings.update(sft_steps=None, sft_accuracy_band=args.sft_accuracy_band, sft_eval_every=args.sft_eval_every,
                        sft_max_steps=args.sft_max_steps)
    plan = ({arm: list(range(n)) for arm, n in FULL_ARMS.items()} if args.full
            else {arm: list(args.seeds) for arm in args.arms})
    result_path = out.with_suffix(".json")
    result = {"label": args.label, "note": args.note, "criterion": CRITERION, "settings": settings, "plan": plan, "runs": []}
    result_path.write_text(json.dumps(result, indent=1))  # the criterion is on disk before any run

    seeds = sorted({s for ss in plan.values() for s in ss})
    if args.report_only:
        runs = [finished_run(work, arm, s, settings) for arm, ss in plan.items() for s in ss]
        band = args.sft_accuracy_band
        result["warm_starts"] = {s: json.loads((work / band_run_name(TASKS[args.task][1], band, args.sft_eval_every, s)
                                                / "warm_start" / "choice.json").read_text()) for s in seeds} if band else {}
    else:
        runs, result["warm_starts"] = train_all(plan, seeds, work, settings, args)
    result.update(runs=runs, table=table(runs), verdict=verdict(runs, args.budget), paired_against_random=paired(runs))
    result_path.write_text(json.dumps(result, indent=1, allow_nan=False, default=str))
    title = f"{args.label} {task}, {args.reward} oracle, {args.prompts} prompts/iteration".strip()
    plot(runs, out.with_suffix(".png"), title)
    shared = set.intersection(*(set(ss) for ss in plan.values()))
    if shared != set(seeds):  # arms of fewer seeds: every arm again on the seeds they all have, like for like
        plot([r for r in runs if r["seed"] in shared], out.with_name(f"{out.name}_{len(shared)}seed.png"),
             f"{title}, seeds {min(shared)}-{max(shared)}")
    print(json.dumps({k: result[k] for k in ("table", "paired_against_random", "verdict")}, indent=1))


if __name__ == "__main__":
    main()
