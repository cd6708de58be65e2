"""`winnow quickstart`: see winnow learn on a laptop CPU in a few minutes, with nothing to download.

1. build a character tokenizer (trained locally) and a ~0.5M-parameter Qwen2-shaped model (`init_model`, the
   `winnow init-model` command);
2. warm-start it with a short SFT on 2-digit addition, stopped while held-out accuracy is still climbing
   (RL only helps once the model samples correct answers fairly often);
3. run GRPO with an exact-match reward, evaluating held-out greedy accuracy as it goes;
4. print accuracy before and after RL and write the learning curves.

Every step is the public API a user would call (`train_sft`, `train`), so the quickstart is also a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from winnow.algorithms import OBJECTIVES
from winnow.data import DataConfig
from winnow.learner.learner import LearnerConfig
from winnow.logging import LoggingConfig, read_metrics
from winnow.loops.config import EvalConfig, RolloutConfig
from winnow.oracles import OracleConfig, RuleOracleConfig
from winnow.recipes.init_model import InitModelConfig, init_model
from winnow.recipes.rl import TrainConfig, train
from winnow.recipes.sft import SFTConfig, train_sft
from winnow.setup import ModelConfig, setup_process


@dataclass
class QuickstartConfig:
    """Tiny model + 2-digit addition on CPU: SFT warm start, then RL; prints held-out accuracy before/after."""

    output_dir: str = "runs/quickstart"
    """where the model, the runs and the plots go"""
    task: str = "arithmetic"
    """built-in task"""
    algo: str = "grpo"
    """RL objective: grpo, dr-grpo or rloo"""
    seed: int = 0
    """seeds the model's initial weights, data order and sampling"""
    sft_steps: int = 250
    """SFT warm-start steps (batch 128): enough to sample right answers often, not so many that RL has
    nothing left to do"""
    sft_lr: float = 1e-3
    """SFT learning rate (a 0.5M-parameter model from scratch takes a large one)"""
    rl_iterations: int = 200
    """policy iterations of RL"""
    rl_lr: float = 3e-5
    """RL learning rate (5e-4 collapsed accuracy in calibration; 1e-5..3e-5 learns)"""
    prompts_per_iteration: int = 32
    """prompts per policy iteration"""
    num_samples: int = 8
    """responses per prompt"""
    eval_every: int = 25
    """policy iterations between held-out evaluations"""
    num_threads: int | None = None
    """torch CPU threads; None uses OMP_NUM_THREADS if set, else min(4, cores)"""
    device: str = "cpu"
    """the quickstart's model is tiny: the CPU is the right place for it"""
    progress: bool = True
    """show progress bars"""
    overwrite: bool = False
    """replace the runs of an earlier quickstart in OUTPUT_DIR (without it, a used OUTPUT_DIR is refused)"""


def check_output_dir(config: QuickstartConfig) -> None:
    """Refuse an OUTPUT_DIR that already holds a quickstart's runs (two runs in one directory would mix their
    metrics and print a wrong before/after figure), unless `overwrite`."""
    used = [name for name in ("init", "sft", config.algo) if (Path(config.output_dir) / name).exists()]
    if used and not config.overwrite:
        raise ValueError(f"{config.output_dir} already holds a quickstart ({', '.join(used)}): pass --overwrite "
                         f"to replace it, or --output-dir for a fresh directory")


def quickstart(config: QuickstartConfig) -> dict[str, float]:
    """Run the quickstart; returns held-out greedy accuracy before and after RL."""
    check_output_dir(config)
    sft_final = warm_start(config)
    print(f"[2/3] {config.algo}: {config.rl_iterations} policy iterations x "
          f"{config.prompts_per_iteration} prompts x {config.num_samples} samples")
    rl_dir = train(TrainConfig(
        algo=OBJECTIVES[config.algo](), model=ModelConfig(path=str(sft_final)), data=DataConfig(train=config.task),
        oracle=OracleConfig(rule=RuleOracleConfig(rewards=["exact"])), logging=LoggingConfig(progress=config.progress),
        num_iterations=config.rl_iterations, run_name=config.algo,
        rollout=RolloutConfig(prompts_per_iteration=config.prompts_per_iteration,
                              num_samples=config.num_samples, max_tokens=8),
        learner=LearnerConfig(lr=config.rl_lr, micro_batch_size=256),
        eval=EvalConfig(every=config.eval_every, k=4, max_prompts=200), **_common(config),
    ))
    evals = [r for r in read_metrics(rl_dir) if "eval/greedy_accuracy" in r]
    before, after = evals[0]["eval/greedy_accuracy"], evals[-1]["eval/greedy_accuracy"]
    print(f"[3/3] held-out greedy accuracy: {100 * before:.1f}% before {config.algo}, "
          f"{100 * after:.1f}% after ({100 * (after - before):+.1f} points)")
    print(f"      mean@4 accuracy: {100 * evals[0]['eval/mean@4_accuracy']:.1f}% -> "
          f"{100 * evals[-1]['eval/mean@4_accuracy']:.1f}%")
    print(f"      learning curves: {rl_dir / 'plots'}; metrics: {rl_dir / 'metrics.jsonl'}")
    return {"before": before, "after": after}


def warm_start(config: QuickstartConfig) -> Path:
    """Steps 1 and 2: the tiny model and tokenizer (OUTPUT_DIR/init), then the SFT warm start; returns the
    SFT model's directory (OUTPUT_DIR/sft/final), the starting point of the RL runs."""
    setup_process(config.seed, config.num_threads)
    out = Path(config.output_dir)
    # `winnow init-model --data.train TASK --size tiny --no-chat-template`: the task's characters, no role markers
    init_dir = init_model(InitModelConfig(output_dir=str(out / "init"), data=DataConfig(train=config.task, seed=config.seed),
                                          size="tiny", chat_template=False, seed=config.seed))
    print(f"[1/3] SFT warm start: {config.sft_steps} steps on {config.task}")
    sft_dir = train_sft(SFTConfig(
        model=ModelConfig(path=str(init_dir)), data=DataConfig(train=config.task),
        oracle=OracleConfig(rule=RuleOracleConfig(rewards=["exact"])), logging=LoggingConfig(progress=config.progress),
        learner=LearnerConfig(lr=config.sft_lr, warmup_steps=10, lr_schedule="constant", micro_batch_size=128),
        eval=EvalConfig(every=50, k=0, max_prompts=200), batch_size=128, num_steps=config.sft_steps,
        max_tokens=8, run_name="sft", **_common(config),
    ))
    return sft_dir / "final"


def _common(config: QuickstartConfig) -> dict:
    return dict(seed=config.seed, device=config.device, num_threads=config.num_threads, output_dir=config.output_dir,
                overwrite=config.overwrite)
