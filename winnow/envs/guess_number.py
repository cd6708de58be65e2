"""`guess-number`: a built-in game that a tiny character-level model learns on CPU.

A number between 1 and `high` is hidden; each turn the policy answers one number. The observation is compact
(a few characters the quickstart's tokenizer reads) and carries the whole state, the interval still possible:

    reset        -> "1-9:"       the hidden number is in 1..9
    action "5"   -> "6-9:"       wrong, and it is higher: 6..9 remain (reward -0.1, a turn's cost)
    action "7"   -> "=" (done)   right (reward +1)

A guess outside the interval wastes the turn (interval unchanged, -0.1); an answer that is not a number ends
the episode (-1, worse than any honest try). After `max_turns` guesses the game is over (terminated: running
out of guesses is the game's own rule, so the return is final). Bisection solves 1..9 within 3 turns for 7 of
the 9 numbers, guessing anywhere in the interval for fewer; per-turn costs make fewer turns worth more.
"""
from __future__ import annotations

import json
import random
from typing import Any

SUCCESS_REWARD = 1.0
TURN_COST = -0.1
INVALID_REWARD = -1.0


class GuessNumberEnv:
    """Guess a number in 1..`high` in at most `max_turns` turns; the observation is the interval left."""

    def __init__(self, high: int = 9, max_turns: int = 3):
        if not 2 <= high <= 9:
            raise ValueError(f"high={high} must be in 2..9 (one-digit answers)")
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns} must be >= 1")
        self.high, self.max_turns = high, max_turns
        self.target, self.low, self.top, self.num_turns = 1, 1, high, 0

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.target = random.Random(seed).randint(1, self.high)
        self.low, self.top, self.num_turns = 1, self.high, 0
        return self.observation(), {"target": self.target}

    def observation(self) -> str:
        return f"{self.low}-{self.top}:"

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.num_turns += 1
        text = action.strip()
        if not text.isdigit():
            return "?", INVALID_REWARD, True, False, {"invalid": True}
        guess = int(text)
        if guess == self.target:
            return "=", SUCCESS_REWARD, True, False, {"success": True}
        if self.low <= guess <= self.top:
            self.low, self.top = (guess + 1, self.top) if guess < self.target else (self.low, guess - 1)
        is_over = self.num_turns >= self.max_turns
        return ("x" if is_over else self.observation()), TURN_COST, is_over, False, {"success": False}


def bisection_action(observation: str) -> str:
    """The optimal policy's answer to an observation "lo-hi:": the interval's midpoint (rounded down)."""
    low, top = (int(x) for x in observation.rstrip(":").split("-"))
    return str((low + top) // 2)


def random_action(observation: str, rng: random.Random) -> str:
    """A valid but unskilled answer: any number still in the interval (the SFT warm start's scripted player)."""
    low, top = (int(x) for x in observation.rstrip(":").split("-"))
    return str(rng.randint(low, top))


def scripted_conversations(num_episodes: int, seed: int = 0, high: int = 9, max_turns: int = 3) -> list[list[dict]]:
    """Episodes of the unskilled scripted player (`random_action`) as chat conversations: observations as user
    turns, answers as assistant turns. SFT on them teaches the format and the rule (answer inside the interval),
    not the skill (bisection), which is RL's to find."""
    rng = random.Random(seed)
    conversations = []
    for k in range(num_episodes):
        env = GuessNumberEnv(high, max_turns)
        observation, _ = env.reset(seed=rng.randrange(2**31))
        messages, is_done = [], False
        while not is_done:
            action = random_action(observation, rng)
            messages += [{"role": "user", "content": observation}, {"role": "assistant", "content": action}]
            observation, _, is_done, _, _ = env.step(action)
        conversations.append(messages)
    return conversations


def write_scripted_episodes(path: str, num_episodes: int, seed: int = 0, high: int = 9, max_turns: int = 3) -> str:
    """`scripted_conversations` as a JSONL file of {"messages": [...]} rows (`winnow sft --data.train PATH`)."""
    with open(path, "w") as f:
        for messages in scripted_conversations(num_episodes, seed, high, max_turns):
            f.write(json.dumps({"messages": messages}) + "\n")
    return path

