"""The reward of `ray_scaling.py`'s runs (`--oracle.rewards benchmarks/ray_scaling_reward.py:parity`): the GRPO
benchmark's synthetic verifiable reward (`grpo_common.parity_reward_texts`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_common  # noqa: E402


def parity(prompts, completions, **columns):
    return grpo_common.parity_reward_texts(completions)
