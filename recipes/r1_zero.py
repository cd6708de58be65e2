"""R1-Zero-like training with Dr. GRPO: RL straight from a base model on verifiable math, in one file to fork.

Read it top to bottom: the config, the format reward, the metrics R1-Zero studies look at, and the loop itself
(generate -> reward -> advantages -> train -> sync -> eval -> log). Everything else is winnow's public API:
the prompt templates (`winnow.data.templates`: DeepSeek-R1-Zero's <think>/<answer> prompt, Qwen2.5-Math's
\\boxed{} prompt), the math-verify grader (`winnow.oracles`, the builtin `math` reward), Dr. GRPO's and GRPO's
advantages and losses (`winnow.algorithms`), the engine, the learner, the weight sync and the logger.

    python recipes/r1_zero.py --model-path Qwen/Qwen2.5-Math-1.5B --data.train reasoning_gym:gsm_symbolic \\
        --data.template qwen_math                                     # a GPU; see recipes/r1_zero.sh
    python recipes/r1_zero.py --model-path runs/quickstart/sft/final --data.train arithmetic  # CPU, minutes

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective") drops GRPO's two
normalisations: the per-response 1/|o_i| (which lets long wrong answers off lightly, so they grow) and the group
std (which over-weights too-easy and too-hard questions). `--algo grpo` runs GRPO on the same loop, to compare.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from winnow.algorithms import OBJECTIVES
from winnow.data import DataConfig, PromptSampler, load_prompts
from winnow.engines.hf import HFEngine
from winnow.eval.accuracy import evaluate_accuracy
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.sync import sync_weights
from winnow.logging import LoggingConfig, MetricsLogger
from winnow.oracles import OracleConfig, RuleOracleConfig, make_oracle
from winnow.setup import ModelConfig, load_policy, resolve_device, setup_process
from winnow.types import SamplingParams


@dataclass
class R1ZeroConfig:
    """R1-Zero-like RL on verifiable math. Defaults: the CPU run on the built-in arithmetic task."""

    model_path: str = "runs/quickstart/sft/final"
    """the base model (a hub id or a directory); on CPU, a tiny model warm-started by SFT (recipes/r1_zero.sh)"""
    data: DataConfig = field(default_factory=lambda: DataConfig(train="arithmetic", template="none"))
    """questions and reference answers: --data.train (a built-in task, reasoning_gym:NAME, a file) and
    --data.template: r1 (<think>/<answer>), qwen_math (\\boxed{}), or none (the bare question)"""
    algo: Literal["dr-grpo", "grpo"] = "dr-grpo"
    """the objective: Dr. GRPO, or GRPO for the comparison"""
    format_weight: float = 0.0
    """weight of the format reward in the total (0: logged, not rewarded; R1-Zero used a small one)"""
    zero_truncated: bool = False
    """reward 0 for a response that hit --max-tokens, whatever it contains (the Dr. GRPO paper's code does: an
    answer cut off mid-reasoning earns nothing); off by default for the CPU task, on in the GPU command"""
    num_iterations: int = 100
    """policy iterations"""
    prompts_per_iteration: int = 32
    """questions per iteration"""
    num_samples: int = 8
    """responses per question (the group)"""
    max_tokens: int = 8
    """the generation budget per response, and Dr. GRPO's loss normaliser"""
    temperature: float = 1.0
    """sampling temperature of the rollouts (evaluation is greedy)"""
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=3e-5, micro_batch_size=256))
    """optimizer settings; --learner.num-mini-batches 2 takes two steps per iteration"""
    eval_every: int = 25
    """iterations between held-out evaluations (also at 0 and at the end)"""
    eval_prompts: int = 200
    """held-out questions evaluated"""
    output_dir: str = "runs/r1_zero"
    """where the run directory (metrics.jsonl, config) goes"""
    seed: int = 0
    """seeds prompt order and sampling"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    num_threads: int | None = None
    """torch CPU threads (None: OMP_NUM_THREADS if set, else min(4, cores))"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb / TensorBoard as well as metrics.jsonl"""


# ----------------------------------------------------------------------------------------------------- rewards

_R1_FORMAT = re.compile(r"^.*?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_BARE_NUMBER = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when a response has the form its template asks for: after R1's prompt (which ends inside <think>),
    "... </think> <answer> ... </answer>"; after Qwen-Math's, a closed \\boxed{}; else a bare number."""
    scores = []
    for prompt, response in zip(prompts, completions):
        if prompt.rstrip().endswith("<think>"):
            scores.append(float(bool(_R1_FORMAT.match(response))))
        elif "\\boxed{}" in prompt:
            scores.append(float(bool(re.search(r"\\boxed\{[^{}]+\}", response))))
        else:
            scores.append(float(bool(_BARE_NUMBER.match(response))))
    return scores


def rollout_metrics(completions, correct: list[bool], formatted: list[float], max_tokens: int) -> dict[str, float]:
    """What R1-Zero studies plot: accuracy, response length of correct and of incorrect answers (tokens), the
    format-reward rate, and the fraction of responses that hit the length limit."""
    lengths = [c.num_tokens for c in completions]
    right = [n for n, ok in zip(lengths, correct) if ok]
    wrong = [n for n, ok in zip(lengths, correct) if not ok]
    return {
        "r1/accuracy": sum(correct) / len(correct),
        "r1/length_correct": sum(right) / len(right) if right else float("nan"),
        "r1/length_incorrect": sum(wrong) / len(wrong) if wrong else float("nan"),
        "r1/length_mean": sum(lengths) / len(lengths),
        "r1/format_rate": sum(formatted) / len(formatted),
        "r1/clipped_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }


def zero_truncated_scores(scores: list[float | None], completions) -> list[float | None]:
    """Each score, or 0.0 where its response hit the generation budget (an unscored response stays None)."""
    return [0.0 if s is not None and c.finish_reason == "length" else s for s, c in zip(scores, completions)]


# ----------------------------------------------------------------------------------------------------- the loop

def train(cfg: R1ZeroConfig) -> Path:
    """Run R1-Zero-like RL; returns the run directory."""
    setup_process(cfg.seed, cfg.num_threads)
    device = resolve_device(cfg.device)
    policy, tokenizer = load_policy(ModelConfig(path=cfg.model_path))
    train_prompts = load_prompts(cfg.data, tokenizer, "train")
    eval_prompts = load_prompts(cfg.data, tokenizer, "eval")[: cfg.eval_prompts]
    sampler = PromptSampler(train_prompts, cfg.prompts_per_iteration, seed=cfg.seed)
    objective = OBJECTIVES[cfg.algo]()  # advantages and loss, exactly as `winnow train dr-grpo|grpo` uses them
    engine = HFEngine(copy.deepcopy(policy), tokenizer, device=device, copy_model=False)  # the actor's copy
    learner = Learner(policy, cfg.learner, cfg.num_iterations * cfg.learner.num_mini_batches, device=device)
    # The verifier first (accuracy counts it), then the format reward; each is logged on its own.
    oracle = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["math", f"{Path(__file__).resolve()}:format_reward"],
                                                            reward_weights=[1.0, cfg.format_weight])), needs="reward")
    run_dir = Path(cfg.output_dir) / f"{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    loss_fn = partial(objective.loss, max_tokens=cfg.max_tokens)

    def evaluate() -> dict[str, float]:
        return evaluate_accuracy(engine, oracle, eval_prompts, max_tokens=cfg.max_tokens, greedy=True, k=0,
                                 seed=cfg.seed).metrics

    with MetricsLogger(run_dir, cfg.logging, run_dir.name, dataclasses.asdict(cfg)) as logger:
        logger.log(evaluate(), step=0)
        for iteration in range(1, cfg.num_iterations + 1):
            prompts = next(sampler)
            # 1. generate: a group of responses per question, seeded per iteration (runs replay exactly)
            params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.num_samples,
                                    seed=cfg.seed * 1_000_003 + iteration)
            completions = engine.generate([p.token_ids for p in prompts], params)
            # 2. reward: math-verify against the reference, plus the format reward
            questions = [p for p in prompts for _ in range(cfg.num_samples)]
            result = oracle.reward([p.text for p in questions], [c.text for c in completions],
                                   [p.reference for p in questions])
            math_scores, formatted = result.components["math"], result.components["format_reward"]
            metrics = rollout_metrics(completions, [s == 1.0 for s in math_scores], formatted, cfg.max_tokens)
            scores = zero_truncated_scores(result.scores, completions) if cfg.zero_truncated else result.scores
            # 3. advantages over each question's group (unscored responses are left out, never scored 0)
            kept = [i for i, s in enumerate(scores) if s is not None]
            batch = make_train_batch([completions[i] for i in kept], None,
                                     torch.tensor([scores[i] for i in kept]), tokenizer.pad_token_id,
                                     group_index=torch.tensor([i // cfg.num_samples for i in kept]))
            advantages = objective.advantages(batch)
            batch.advantages = advantages.values
            # 4. train: the objective's loss, num_mini_batches optimizer steps
            metrics.update({f"train/{k}": v for k, v in learner.train_policy(batch, loss_fn).items()})
            # 5. sync: the learner's weights into the engine
            metrics.update(sync_weights(learner, engine))
            # 6. eval: greedy held-out accuracy
            if iteration % cfg.eval_every == 0 or iteration == cfg.num_iterations:
                metrics.update(evaluate())
            # 7. log
            metrics.update({"reward/mean": sum(scores[i] for i in kept) / max(len(kept), 1),
                            **advantages.metrics, "counts/samples": float(iteration * len(completions))})
            logger.log(metrics, step=iteration)
    oracle.close()
    return run_dir


if __name__ == "__main__":
    import tyro

    print(f"run written to {train(tyro.cli(R1ZeroConfig))}")
