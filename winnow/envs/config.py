"""The `--env*` flags of `winnow train ALGO`: train on episodes of an environment instead of a prompt dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class EnvOptions:
    """Multi-turn episodes (`--env SPEC`); without `--env` the run trains on `--data` prompts as before."""

    env: str | None = None
    """the environment: guess-number[:HIGH[:MAX_TURNS]] (built in), gem:ID (a GEM environment, e.g.
    gem:game:GuessTheNumber-v0-easy), module.path:Class or path/to/file.py:Class; one reset seed per prompt
    (--rollout.prompts-per-iteration), --rollout.num-samples episodes per seed"""
    env_tools: list[str] = field(default_factory=list)
    """tools available inside every episode: python (runs <python>code</python>, the output is the observation)"""
    env_max_turns: int = 8
    """actions per episode at most (an episode still going is truncated)"""
    env_max_tokens: int | None = None
    """tokens per episode at most (observations and actions); None: the model's context length"""
    env_format: Literal["plain", "chat"] = "plain"
    """plain: observations join the conversation as text; chat: as user turns of the chat template"""
    env_truncated: Literal["keep", "drop"] = "keep"
    """truncated episodes (cut by the environment, the turn limit or the token budget): keep trains on the return
    they reached; drop leaves them out of their group"""
    env_workers: int = 8
    """threads that reset and step environments in parallel"""
    env_step_timeout_s: float = 30.0
    """seconds a turn's resets or steps may take, from when they are handed to the workers, before an episode still
    waiting is dropped (counted in env/errors); a hung call holds its worker until it returns"""
    env_success_reward: float = 1.0
    """a terminated episode whose last reward reaches this is a success (unless the env says so in info)"""
    env_eval_episodes: int = 64
    """greedy held-out episodes at each evaluation (seeds apart from training's)"""
    env_tool_timeout_s: float = 5.0
    """the python tool: seconds before the code is killed"""
    env_tool_memory_mb: int = 512
    """the python tool: address-space limit of the code, MiB"""

    def check_env_options(self, max_positions: int | None) -> int:
        """Refuse bad values, naming the flag; returns the episode's token budget."""
        problems = [f"--env-{name.replace('_', '-')} {getattr(self, 'env_' + name)} must be >= 1"
                    for name in ("max_turns", "workers") if getattr(self, "env_" + name) < 1]
        if self.env_step_timeout_s <= 0 or self.env_tool_timeout_s <= 0:
            problems.append("--env-step-timeout-s and --env-tool-timeout-s must be > 0")
        if self.env_eval_episodes < 0:
            problems.append(f"--env-eval-episodes {self.env_eval_episodes} must be >= 0")
        budget = self.env_max_tokens if self.env_max_tokens is not None else max_positions
        if budget is None:
            problems.append("the model does not say its context length: set --env-max-tokens")
        elif budget < 2:
            problems.append(f"--env-max-tokens {budget} must be >= 2")
        elif max_positions is not None and budget > max_positions:
            problems.append(f"--env-max-tokens {budget} is more than the model's context of {max_positions} "
                            f"positions: lower it")
        if problems:
            raise ValueError("; ".join(problems))
        return budget
