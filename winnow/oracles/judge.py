"""An LLM judge behind any OpenAI-compatible chat-completions API (OpenAI, vLLM, SGLang, llama.cpp servers).

Pairwise, as in MT-Bench's judge (Zheng et al. 2023, "Judging LLM-as-a-Judge"): the judge sees the prompt and
two responses and answers "A" or "B". LLM judges favour a position, so every comparison is asked in both
orders and the two verdicts averaged: a judge that always says "A" gives 0.5 (no information), never a
spurious preference. A comparison is judged only when both orders got a parseable answer.

Each call is retried on an API error, a timeout or an unparseable answer, with exponential backoff
(`retry_backoff_s`, then twice that, ...); at most `max_concurrency` calls are in flight (a thread pool).
Metrics per `compare`: `judge/calls`, `judge/latency_s` (mean per call) and `judge/latency_max_s`,
`judge/prompt_tokens` and `judge/completion_tokens` (sums, from the API's usage), `judge/retries`,
`judge/failed` (comparisons left unjudged) and `judge/position_agreement` (fraction of judged pairs whose two
orders agreed: a measure of the judge's position bias).
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from winnow.types import PreferenceResult

logger = logging.getLogger(__name__)

JUDGE_PROMPT = """Which of the two responses below answers the user's prompt better? Judge correctness first, \
then helpfulness; ignore which one comes first and how long each is.

[Prompt]
{prompt}
{reference_block}
[Response A]
{response_a}

[Response B]
{response_b}

Answer with exactly one letter: A or B."""
"""the pairwise prompt; `{reference_block}` holds the reference answer when the dataset has one"""

_BRACKETED = re.compile(r"\[\[\s*([AB])\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:response|answer|output)?\s*\(?\s*([AB])\s*\)?\W*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> float | None:
    """1.0 when the answer picks A, 0.0 when it picks B, None when it is not a clear verdict.

    Accepted: "A", "b", "(A)", "Response B.", "[[A]]" (MT-Bench's format, anywhere in a longer answer).
    Anything else (prose, both letters, empty) is None: the call is retried, never guessed.
    """
    if not text:
        return None
    found = {m.upper() for m in _BRACKETED.findall(text)}
    if len(found) != 1:
        match = _BARE.match(text.strip())
        if not match:
            return None
        found = {match.group(1).upper()}
    return 1.0 if found == {"A"} else 0.0


@dataclass
class _Call:
    verdict: float | None
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class LLMJudgeOracle:
    """A `PreferenceOracle` asking an LLM through the official `openai` client (`pip install winnow[judge]`)."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 max_concurrency: int = 8, max_retries: int = 3, retry_backoff_s: float = 0.5,
                 timeout_s: float = 30.0, max_tokens: int = 16, temperature: float = 0.0,
                 prompt_template: str = JUDGE_PROMPT, client: Any = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"judge max_concurrency={max_concurrency} must be >= 1")
        if max_retries < 0:
            raise ValueError(f"judge max_retries={max_retries} must be >= 0")
        if client is None:
            try:
                import openai
            except ImportError as e:
                raise ImportError("the LLM judge needs the openai client: pip install 'winnow[judge]'") from e
            # Retries are ours (they also cover unparseable answers), so the client's own are off.
            client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.client, self.model = client, model
        self.max_concurrency, self.max_retries, self.retry_backoff_s = max_concurrency, max_retries, retry_backoff_s
        self.timeout_s, self.max_tokens, self.temperature = timeout_s, max_tokens, temperature
        self.prompt_template = prompt_template

    @classmethod
    def from_env(cls, model: str, base_url: str | None, api_key_env: str, **kwargs) -> "LLMJudgeOracle":
        """The key comes from the environment variable `api_key_env`, never from a config file or the CLI."""
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"the LLM judge reads its API key from ${api_key_env}, which is not set; export it "
                             f"(any non-empty value for a local server) or name another variable with "
                             f"--oracle.judge.api-key-env")
        return cls(model, base_url=base_url, api_key=api_key, **kwargs)

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None,
                columns: dict[str, list[Any]] | None = None) -> PreferenceResult:
        n = len(prompts)
        if not len(completions_a) == len(completions_b) == n:
            raise ValueError(f"compare got {n} prompts, {len(completions_a)} a and {len(completions_b)} b responses")
        references = list(references) if references is not None else [None] * n
        # Both orders of every pair: (a shown first) then (b shown first).
        messages = [self._render(p, first, second, ref)
                    for p, a, b, ref in zip(prompts, completions_a, completions_b, references)
                    for first, second in ((a, b), (b, a))]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(len(messages), 1))) as pool:
            calls = list(pool.map(self._call, messages))
        probabilities: list[float | None] = []
        agreed = 0
        for i in range(n):
            forward, swapped = calls[2 * i].verdict, calls[2 * i + 1].verdict
            if forward is None or swapped is None:
                probabilities.append(None)
                continue
            # In the swapped order "A" is response b, so P(a wins) there is 1 - verdict.
            probabilities.append((forward + (1.0 - swapped)) / 2)
            agreed += forward == 1.0 - swapped
        num_judged = sum(p is not None for p in probabilities)
        latencies = [c.latency_s for c in calls] or [0.0]
        metrics = {
            "judge/calls": float(len(calls)),
            "judge/latency_s": sum(latencies) / len(latencies),
            "judge/latency_max_s": max(latencies),
            "judge/prompt_tokens": float(sum(c.prompt_tokens for c in calls)),
            "judge/completion_tokens": float(sum(c.completion_tokens for c in calls)),
            "judge/retries": float(sum(c.retries for c in calls)),
            "judge/failed": float(n - num_judged),
            "judge/position_agreement": agreed / num_judged if num_judged else float("nan"),
        }
        return PreferenceResult(probabilities, metrics)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()

    def _render(self, prompt: str, first: str, second: str, reference: str | None) -> str:
        block = f"\n[Reference answer]\n{reference}\n" if reference is not None else ""
        return self.prompt_template.format(prompt=prompt, response_a=first, response_b=second,
                                           reference_block=block)

    def _call(self, content: str) -> _Call:
        """One verdict, with retries; a verdict of None after `max_retries` retries is a failed call."""
        start = time.perf_counter()
        prompt_tokens = completion_tokens = 0
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}],
                    max_tokens=self.max_tokens, temperature=self.temperature, timeout=self.timeout_s,
                )
            except Exception as e:  # noqa: BLE001  (API errors, timeouts, connection resets: all retried)
                problem = f"{type(e).__name__}: {e}"
                continue
            usage = getattr(response, "usage", None)
            if usage is not None:
                prompt_tokens += usage.prompt_tokens or 0
                completion_tokens += usage.completion_tokens or 0
            text = response.choices[0].message.content if response.choices else None
            verdict = parse_verdict(text)
            if verdict is not None:
                logger.debug("judge %s: verdict %s after %d retries, %.3f s, %d prompt / %d completion tokens",
                             self.model, verdict, attempt, time.perf_counter() - start, prompt_tokens,
                             completion_tokens)
                return _Call(verdict, time.perf_counter() - start, prompt_tokens, completion_tokens, attempt)
            problem = f"unparseable answer {text!r}"
        logger.warning("judge %s gave no verdict after %d tries: %s", self.model, self.max_retries + 1, problem)
        return _Call(None, time.perf_counter() - start, prompt_tokens, completion_tokens, self.max_retries)
