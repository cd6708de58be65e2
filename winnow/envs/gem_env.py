"""`gem:ID`: any GEM environment (`pip install gem-llm`; https://github.com/axon-rl/gem) by its registered id,
e.g. `gem:game:GuessTheNumber-v0-easy` or `gem:rg:letter_counting`.

GEM's `Env` already has winnow's protocol; the adapter adds three things. Its `reset(seed)` seeds Python's
global `random` (and numpy's) before drawing the task, so resets run one at a time under a lock: episodes reset
from parallel workers would otherwise draw each other's numbers. Environments that need data this machine does
not have (Wordle's nltk word list; the hub datasets of `math:*`, `code:*`, `qa:*`, `logic:*`, `eval:*`) fail at start-up with a message
saying so. And GEM marks the end of a game by its own turn limit as both terminated and truncated; the episode
runner reads terminated first (the game's rules ended it: the return is final).
"""
from __future__ import annotations

import re
import threading
from typing import Any

from winnow.envs.base import EnvUnavailableError

_RESET_LOCK = threading.Lock()

_NEEDS_DATA = {
    "math:": "a math dataset from the Hugging Face hub",
    "code:": "a code dataset from the Hugging Face hub",
    "qa:": "a QA dataset from the Hugging Face hub",
    "logic:": "a logic dataset from the Hugging Face hub",
    "eval:": "an evaluation dataset from the Hugging Face hub",
}


class GEMEnv:
    """One GEM environment, made by `gem.make(env_id)`."""

    def __init__(self, env_id: str, **kwargs):
        self.env_id = env_id
        self.env = make_gem(env_id, **kwargs)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        with _RESET_LOCK:  # GEM seeds the process-wide `random` and draws from it
            return self.env.reset(seed=seed)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        return self.env.step(action)


def make_gem(env_id: str, **kwargs):
    """`gem.make(env_id)`, with failures that name what is missing."""
    try:
        import gem
    except ImportError as e:
        raise EnvUnavailableError(f"--env gem:{env_id} needs GEM: pip install \"winnow[gem]\" ({e})") from e
    known = sorted(gem.envs.registration.ENV_REGISTRY) if hasattr(gem, "envs") else []
    if known and env_id not in known:
        close = [k for k in known if k.split("-")[0] == env_id.split("-")[0]] or known[:8]
        raise EnvUnavailableError(f"--env gem:{env_id}: GEM has no environment {env_id!r}; "
                                  f"e.g. {', '.join(close[:8])} (ids carry a difficulty suffix such as -easy)")
    try:
        with _RESET_LOCK:  # constructors reset too
            return gem.make(env_id, **kwargs)
    except ImportError as e:  # GEM imports an environment's module at make time
        raise EnvUnavailableError(f"--env gem:{env_id} needs a package that is not installed ({_first_line(e)}): "
                                  f"pip install it") from e
    except LookupError as e:  # nltk's "Resource ... not found"
        raise EnvUnavailableError(
            f"--env gem:{env_id} needs nltk data that is not on this machine and could not be downloaded "
            f"({_first_line(e)}); on a machine with network run `python -m nltk.downloader words` (or the "
            f"resource named) and copy ~/nltk_data here") from e
    except Exception as e:
        needs = next((what for prefix, what in _NEEDS_DATA.items() if env_id.startswith(prefix)), None)
        if needs is None:
            raise
        raise EnvUnavailableError(f"--env gem:{env_id} loads {needs}, which failed ({type(e).__name__}: "
                                  f"{_first_line(e)}); it needs network access or the dataset in the local "
                                  f"cache (HF_HUB_OFFLINE=1 reads only the cache)") from e


def _first_line(error: Exception) -> str:
    """The gist of an error: its first two real lines, without nltk's banner and terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip() and "*" * 10 not in line]
    return " ".join(lines[:2])[:300] or type(error).__name__
