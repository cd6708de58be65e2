"""Episodes: the policy and an environment take turns until the episode ends.

    reset every copy (parallel workers) ─► loop over turns:
        the engine generates one turn for every live episode at once (one batched call)
        every live episode's environment steps on its action (parallel workers, each step timed out)
        the observation joins the conversation as the next turn; ended episodes leave the batch

An episode ends on termination, on truncation, at `max_turns` actions, or when the conversation reaches
`max_tokens` tokens (the last two count as truncation). A reset or step that raises or outlasts
`step_timeout_s` drops that episode (counted; the run goes on): its partial return is never trained on as if
it were the environment's word. A timed-out step's thread cannot be killed: it finishes in the background.

What the engine reuses between turns: each turn's prompt is the whole conversation so far. The embedded `hf`
engine keeps no KV cache across `generate` calls, so it prefills the whole conversation again every turn
(benchmarks/multiturn_prefill.py measures the cost); vLLM's prefix caching (`--vllm-engine.enable-prefix-caching`,
on by default) finds the conversation's earlier blocks in its cache and prefills only the new turn.
"""
from __future__ import annotations

import concurrent.futures as futures
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from winnow.envs import EnvFactory, StepResult
from winnow.loops.seam import Actor
from winnow.types import Episode, SamplingParams


@dataclass
class EpisodeConfig:
    """How episodes run."""

    max_turns: int = 8
    """actions per episode at most; an episode still going after them is truncated"""
    max_tokens: int = 1024
    """tokens per episode at most (first observation, actions and observations); an episode that reaches it is
    truncated, and a turn's generation budget is cut to what is left"""
    format: Literal["plain", "chat"] = "plain"
    """how an observation joins the conversation: "plain" (its text as is; models without a chat template) or
    "chat" (a user turn of the tokenizer's chat template, the policy's response an assistant turn)"""
    num_workers: int = 8
    """threads that reset and step environments in parallel"""
    step_timeout_s: float = 30.0
    """a reset or step not done this many seconds after the turn's calls were handed to the workers drops its
    episode (counted in env/errors); a hung call keeps its worker thread until it returns, so give spare workers"""
    success_reward: float = 1.0
    """an episode counts as a success when it terminated and its last reward reached this (unless the
    environment says so itself in info["success"]); GEM's games and reasoning tasks give 1.0 for a solve"""


@dataclass
class EpisodeStats:
    """What one batch of episodes cost and lost."""

    num_errors: int = 0
    """episodes dropped because their environment raised or timed out"""
    errors: list[str] = field(default_factory=list)
    """the first few error messages, for the log"""
    env_seconds: float = 0.0
    """wall seconds spent waiting on environments (resets and steps)"""
    generate_seconds: float = 0.0
    """wall seconds spent in the engine"""
    prefill_tokens: int = 0
    """prompt tokens handed to the engine over all turns (each turn's whole conversation)"""


class _Live:
    """An episode in progress: its environment and the conversation so far."""

    def __init__(self, env: Any, seed: int, index: int):
        self.env, self.index = env, index
        self.episode = Episode(token_ids=[], policy_mask=[], logprobs=[], seed=seed)
        self.messages: list[dict[str, str]] = []

    def add(self, ids: list[int], is_policy: bool, logprobs: list[float] | None = None) -> None:
        self.episode.token_ids += ids
        self.episode.policy_mask += [int(is_policy)] * len(ids)
        self.episode.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


class EpisodeRunner:
    """Runs batches of episodes of one environment with the actor's engine."""

    def __init__(self, factory: EnvFactory, actor: Actor, tokenizer, config: EpisodeConfig):
        self.factory, self.actor, self.tokenizer, self.config = factory, actor, tokenizer, config
        self.pool = futures.ThreadPoolExecutor(max_workers=config.num_workers, thread_name_prefix="winnow-env")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self, seeds: list[int], params: SamplingParams, *, sample_seed: int) -> tuple[list[Episode | None], EpisodeStats]:
        """`params.n` episodes per seed (copies reset with the same seed: a group), in seed order; None where an
        episode was dropped for an environment error. Turn t of episode i samples with the key
        (sample_seed, i, t), so runs replay exactly."""
        stats = EpisodeStats()
        start = time.perf_counter()
        copies = [(seed, self.factory()) for seed in seeds for _ in range(params.n)]
        stats.env_seconds += time.perf_counter() - start
        results: list[Episode | None] = [None] * len(copies)
        live = [_Live(env, seed, i) for i, (seed, env) in enumerate(copies)]
        resets = self._parallel([(item.env.reset, item.episode.seed) for item in live], _check_reset, stats)
        started = [(item, reset) for item, reset in zip(live, resets) if reset is not None]
        for item, (observation, _info) in started:
            self._start(item, observation)
        live = [item for item, _ in started]
        for turn in range(self.config.max_turns):
            if not live:
                break
            self._generate(live, params, sample_seed, turn, stats)
            steps = self._parallel([(item.env.step, item.episode.actions[-1]) for item in live], StepResult.of, stats)
            still = []
            for item, step in zip(live, steps):
                if step is None:
                    continue  # dropped: its environment raised or timed out
                if self._observe(item, step, is_last_turn=turn == self.config.max_turns - 1):
                    still.append(item)
                else:
                    results[item.index] = item.episode
            live = still
        return results, stats

    def _start(self, item: _Live, observation: str) -> None:
        item.episode.observations.append(observation)
        item.add(self._observation_ids(item, observation), is_policy=False)
        if not item.episode.token_ids:
            raise ValueError(f"the environment's first observation {observation[:80]!r} is no tokens in this "
                             f"tokenizer (characters it does not know are dropped): the policy has nothing to read")
        if len(item.episode.token_ids) >= self.config.max_tokens:
            raise ValueError(f"the environment's first observation is {len(item.episode.token_ids)} tokens, no fewer "
                             f"than the episode's budget of {self.config.max_tokens}: raise --env-max-tokens")

    def _generate(self, live: list[_Live], params: SamplingParams, sample_seed: int, turn: int,
                  stats: EpisodeStats) -> None:
        """One turn for every live episode: one engine call per distinct generation budget (the token budget
        cuts the budget of episodes near it)."""
        by_budget: dict[int, list[_Live]] = {}
        for item in live:
            budget = min(params.max_tokens, self.config.max_tokens - len(item.episode.token_ids))
            by_budget.setdefault(budget, []).append(item)
        start = time.perf_counter()
        for budget, items in by_budget.items():
            turn_params = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                         max_tokens=budget, n=1, stop=list(params.stop),
                                         prompt_seeds=[_key(sample_seed, item.index, turn) for item in items])
            prompts = [item.episode.token_ids for item in items]
            stats.prefill_tokens += sum(len(p) for p in prompts)
            for item, completion in zip(items, self.actor.generate(prompts, turn_params)):
                item.add(completion.response_ids, is_policy=True, logprobs=list(completion.logprobs))
                item.episode.turn_ends.append(len(item.episode.token_ids) - 1)
                item.episode.actions.append(completion.text)
                item.messages.append({"role": "assistant", "content": completion.text})
        stats.generate_seconds += time.perf_counter() - start

    def _observe(self, item: _Live, step: StepResult, is_last_turn: bool) -> bool:
        """Record a step; True while the episode goes on (its observation then joins the conversation)."""
        e = item.episode
        e.turn_rewards.append(step.reward)
        e.observations.append(step.observation)
        if step.terminated:  # the environment's word wins over truncation (GEM sets both at its turn limit)
            e.terminated = True
            e.is_success = bool(step.info.get("success", step.reward >= self.config.success_reward))
            return False
        if step.truncated or is_last_turn:
            e.truncated = True
            return False
        item.add(self._observation_ids(item, step.observation), is_policy=False)
        if len(e.token_ids) >= self.config.max_tokens:
            e.truncated = True
            return False
        return True

    def _observation_ids(self, item: _Live, observation: str) -> list[int]:
        """The tokens an observation adds to the conversation."""
        if self.config.format == "plain":
            return self.tokenizer.encode(observation, add_special_tokens=False)
        before = _render(self.tokenizer, item.messages, add_generation_prompt=False) if item.messages else ""
        item.messages.append({"role": "user", "content": observation})
        after = _render(self.tokenizer, item.messages, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the tokenizer's chat template does not render a conversation incrementally (a turn "
                             "changes the text before it): use --env-format plain")
        text = after[len(before):]
        eos = self.tokenizer.eos_token or ""
        if before and eos and text.startswith(eos) and item.episode.token_ids[-1] == self.tokenizer.eos_token_id:
            text = text[len(eos):]  # the policy's own EOS already closed its turn
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _parallel(self, calls: list[tuple[Any, Any]], parse, stats: EpisodeStats) -> list[Any]:
        """Run environment calls `fn(arg)` in the worker threads, each result through `parse`; None for a call
        that raised, returned the wrong shape or timed out (counted). All calls share one deadline."""
        start = time.perf_counter()
        pending = [self.pool.submit(fn, arg) for fn, arg in calls]
        deadline = start + self.config.step_timeout_s
        results = []
        for future in pending:
            try:
                results.append(parse(future.result(timeout=max(0.0, deadline - time.perf_counter()))))
            except futures.TimeoutError:
                future.cancel()
                results.append(self._error(stats, f"timed out after {self.config.step_timeout_s:g} s "
                                                  f"(--env-step-timeout-s)"))
            except Exception as e:  # the environment's failure: the episode is dropped and counted
                results.append(self._error(stats, f"{type(e).__name__}: {e}"))
        stats.env_seconds += time.perf_counter() - start
        return results

    @staticmethod
    def _error(stats: EpisodeStats, message: str) -> None:
        stats.num_errors += 1
        if len(stats.errors) < 3:
            stats.errors.append(message)
        return None


def _check_reset(result: Any) -> tuple[str, dict]:
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"Env.reset must return (observation, info), got {result!r}")
    return str(result[0]), dict(result[1] or {})


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _key(sample_seed: int, index: int, turn: int) -> int:
    """The sampling key of one turn of one episode (distinct for every (episode, turn) of a call)."""
    return (sample_seed * 1_000_003 + index * 1009 + turn) % (2**63)
