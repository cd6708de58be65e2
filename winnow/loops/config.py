"""Settings the loops read: what the actor samples each iteration, and when and how the loop evaluates."""
from __future__ import annotations

from dataclasses import dataclass, field

from winnow.exploration.apl import APLConfig
from winnow.exploration.sea import SEAConfig
from winnow.types import SamplingParams


@dataclass
class RolloutConfig:
    """What the Actor samples each policy iteration."""

    prompts_per_iteration: int = 32
    """prompts drawn per policy iteration"""
    num_samples: int = 8
    """responses sampled per prompt (the group size G of GRPO/RLOO; PPO works with any, 1 included)"""
    temperature: float = 1.0
    """sampling temperature; the learner divides its logits by the same value"""
    top_p: float = 1.0
    """nucleus sampling mass (0, 1]"""
    top_k: int = -1
    """top-k sampling; -1 is off"""
    max_tokens: int = 256
    """generation budget per response (also Dr. GRPO's loss normaliser)"""
    stop: list[str] = field(default_factory=list)
    """stop strings, besides EOS"""
    drop_uniform_groups: bool = False
    """drop groups whose rewards are all equal (they carry no signal with group baselines; DAPO's
    dynamic sampling without the refill); ignored by objectives without a group baseline (ppo)"""
    max_idle_iterations: int = 5
    """iterations in a row that train nothing (every sample unscored, every group uniform) before the run stops
    with an error saying why; a run that trains nothing at all is an error too"""

    def __post_init__(self) -> None:
        """Refuse bad values here, naming the flag, rather than later as SamplingParams' fields (`n=0`)."""
        problems = []
        for name in ("prompts_per_iteration", "num_samples", "max_tokens", "max_idle_iterations"):
            if getattr(self, name) < 1:
                problems.append(f"--rollout.{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            problems.append(f"--rollout.temperature {self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"--rollout.top-p {self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"--rollout.top-k {self.top_k} must be -1 (off) or a positive integer")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_samples

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        """The engine's SamplingParams for one policy iteration (the loop sets a seed per iteration)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, n=self.num_samples, stop=list(self.stop), seed=seed)


@dataclass
class EvalConfig:
    """Held-out evaluation, run at iteration 0, every `every` iterations and at the end."""

    every: int = 10
    """policy iterations between evaluations; 0 evaluates only at the start and the end"""
    max_prompts: int | None = 256
    """held-out prompts used (None: all)"""
    greedy: bool = True
    """report greedy accuracy"""
    k: int = 4
    """samples per prompt for mean@k accuracy (0 turns it off)"""
    temperature: float = 1.0
    """sampling temperature for mean@k"""
    max_tokens: int | None = None
    """generation budget for eval; None uses rollout.max_tokens"""
    correct_threshold: float = 1.0
    """a response counts as correct when the eval reward is at least this"""


@dataclass
class WinRateConfig:
    """Win rate of greedy responses against reference responses, at iteration 0, every `every` and at the end."""

    every: int = 10
    """policy iterations between evaluations; 0 evaluates only at the start and the end"""
    max_prompts: int | None = 200
    """held-out prompts used (None: all)"""
    max_tokens: int | None = None
    """generation budget for eval; None uses rollout.max_tokens"""
    reference_column: str | None = "reference_response"
    """the eval data's column with the reference response to beat; None uses the answer column itself"""
    best_of_n: int = 0
    """also sample this many responses per prompt and let the selector's reward model choose one (SEA's ensemble:
    --pairs.selection sea-*), which plays the reference (`eval/best_of_n_win_rate`, beside `eval/sample_win_rate`
    of a plain sample); 0: off. Costs 2 oracle queries a prompt, counted with the eval's"""


@dataclass
class PairConfig:
    """How the online loop picks the pair of responses it asks the oracle about."""

    selection: str = "best_vs_worst"
    """a selector of `winnow.exploration.SELECTORS`: random (any oracle; one comparison per prompt) or
    best_vs_worst (oracles with scalar rewards: rule, remote and reward_model; every response is scored, one
    query each, and the best and worst form the pair); active exploration (one comparison per prompt):
    sea-ee, sea-bai, sea-uncertainty, sea-passive, sea-greedy (SEA's epistemic reward model, `--pairs.sea.*`),
    apl, apl-certainty (`--pairs.apl.*`), xpo (with `winnow train xpo`)"""
    sea: SEAConfig = field(default_factory=SEAConfig)
    """SEA's feature backbone, ensemble reward model and mixed preference learning"""
    apl: APLConfig = field(default_factory=APLConfig)
    """APL's prompt filter and implicit-reward beta"""
