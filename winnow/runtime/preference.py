"""The online preference loop (online DPO / IPO / SLiC / SimPO), in one process.

One policy iteration, in named phases, each timed and logged as `time/<phase>`:

    generate → judge (pick a pair per prompt, get its preference) → train → sync → (eval) → log

This is online AI feedback (Guo et al. 2024, OAIF): the pair is sampled from the current policy and labelled
by the oracle now, so the data are always on-policy. The preference probability p (a beats b) is used as a
label: chosen = a when p > 0.5, b when p < 0.5; a tie (p exactly 0.5, e.g. equal rule rewards) carries no
label and a pair the oracle could not judge carries none either: both are counted and never trained on.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Protocol

from winnow.engines.base import Engine
from winnow.eval.win_rate import evaluate_win_rate, reference_responses
from winnow.learner.learner import Learner
from winnow.learner.pairs import make_pair_batch, train_pairs
from winnow.oracles.base import PreferenceOracle, RewardOracle
from winnow.oracles.preference import bradley_terry
from winnow.runtime.local import Counters, PhaseTimer, _mean
from winnow.types import Completion, PreferencePair, Prompt

PairSelection = Literal["random", "best_vs_worst"]


@dataclass
class Candidate:
    """A pair of one prompt's responses and the oracle's probability that `a` beats `b` (None: unjudged)."""

    prompt: Prompt
    a: Completion
    b: Completion
    probability: float | None


class PairSelector(Protocol):
    def __call__(self, prompts: list[Prompt], groups: list[list[Completion]], oracle: PreferenceOracle,
                 rng: random.Random) -> tuple[list[Candidate], dict[str, float], int]:
        """One candidate pair per prompt, the oracle's metrics, and the number of oracle queries spent."""
        ...


def random_pairs(prompts, groups, oracle, rng):
    """Two of the prompt's responses at random (two different texts when there are any), compared by the oracle:
    one query per pair. Works with every oracle, including judges that only compare."""
    chosen = []
    for group in groups:
        first = rng.randrange(len(group))
        others = [j for j in range(len(group)) if j != first and group[j].text != group[first].text]
        others = others or [j for j in range(len(group)) if j != first]
        chosen.append((group[first], group[rng.choice(others)]))
    result = oracle.compare([p.text for p in prompts], [a.text for a, _ in chosen], [b.text for _, b in chosen],
                            [p.reference for p in prompts], _columns(prompts))
    candidates = [Candidate(p, a, b, prob) for p, (a, b), prob in zip(prompts, chosen, result.probabilities)]
    return candidates, result.metrics, len(prompts)


def best_vs_worst_pairs(prompts, groups, oracle, rng):
    """Score every response and pair the best with the worst (one query per response): the most informative
    pair when the oracle gives scalar rewards (as in Xu et al. 2023's "best-vs-worst" online DPO recipes).
    P(best beats worst) is Bradley-Terry on the two scores."""
    if not isinstance(oracle, RewardOracle):
        raise ValueError(f"pairs.selection='best_vs_worst' needs an oracle that scores responses; "
                         f"{type(oracle).__name__} only compares: use --pairs.selection random")
    repeated = [p for p, group in zip(prompts, groups) for _ in group]
    flat = [c for group in groups for c in group]
    result = oracle.reward([p.text for p in repeated], [c.text for c in flat], [p.reference for p in repeated],
                           _columns(repeated))
    temperature = getattr(oracle, "temperature", 1.0)
    candidates, start = [], 0
    for prompt, group in zip(prompts, groups):
        scored = [(s, c) for s, c in zip(result.scores[start:start + len(group)], group) if s is not None]
        start += len(group)
        if len(scored) < 2:
            candidates.append(Candidate(prompt, group[0], group[-1], None))
            continue
        (best_score, best), (worst_score, worst) = max(scored, key=_score), min(scored, key=_score)
        candidates.append(Candidate(prompt, best, worst, bradley_terry(best_score, worst_score, temperature)))
    return candidates, result.metrics, len(flat)


PAIR_SELECTORS: dict[str, PairSelector] = {"random": random_pairs, "best_vs_worst": best_vs_worst_pairs}
"""how a pair is picked from a prompt's responses, by `PairConfig.selection`"""


def _score(item):
    return item[0]


def _columns(prompts: list[Prompt]) -> dict[str, list]:
    return {key: [p.columns.get(key) for p in prompts] for key in prompts[0].columns} if prompts else {}


@dataclass
class PreferenceCounters(Counters):
    """Counters plus pairs: judged, tied (no label) and unjudged (the oracle failed)."""

    pairs: int = 0
    trained_pairs: int = 0
    tied_pairs: int = 0
    unjudged_pairs: int = 0
    eval_oracle_queries: int = 0


def to_pairs(candidates: list[Candidate]) -> tuple[list[PreferencePair], dict[str, float]]:
    """Labelled pairs from candidates: ties and unjudged candidates are dropped and counted."""
    pairs, margins, num_tied, num_unjudged = [], [], 0, 0
    for c in candidates:
        if c.probability is None:
            num_unjudged += 1
        elif c.probability == 0.5:
            num_tied += 1
        else:
            a_wins = c.probability > 0.5
            chosen, rejected = (c.a, c.b) if a_wins else (c.b, c.a)
            probability = c.probability if a_wins else 1.0 - c.probability
            pairs.append(PreferencePair(c.prompt, chosen, rejected, probability))
            margins.append(2 * probability - 1)
    metrics = {"pref/pairs": float(len(pairs)), "pref/tied": float(num_tied), "pref/unjudged": float(num_unjudged),
               "pref/mean_margin": _mean(margins)}
    return pairs, metrics


class PreferenceRuntime:
    """Runs online preference optimisation: `run()` evaluates, iterates, evaluates."""

    def __init__(self, config, *, engine: Engine, learner: Learner, oracle: PreferenceOracle, objective,
                 train_stream: Iterator[list[Prompt]], eval_prompts: list[Prompt], logger, run_dir: Path,
                 pad_token_id: int, progress=None):
        self.config, self.engine, self.learner, self.oracle = config, engine, learner, oracle
        self.objective, self.train_stream, self.eval_prompts = objective, train_stream, eval_prompts
        self.logger, self.run_dir, self.pad_token_id, self.progress = logger, run_dir, pad_token_id, progress
        self.select_pairs = PAIR_SELECTORS[config.pairs.selection]
        self.eval_references = reference_responses(eval_prompts, config.eval.reference_column)
        self.counters = PreferenceCounters()
        self.rng = random.Random(config.seed)
        self.sampling = config.rollout.sampling_params()
        self.history: list[dict[str, float]] = []

    def run(self) -> list[dict[str, float]]:
        timer = PhaseTimer()
        with timer("eval"):
            metrics = self.evaluate()
        self.log(metrics, timer)
        for iteration in range(1, self.config.num_iterations + 1):
            self.step(iteration)
        return self.history

    def step(self, iteration: int) -> dict[str, float]:
        """One policy iteration."""
        self.counters.iteration = iteration
        timer = PhaseTimer()
        prompts = next(self.train_stream)
        with timer("generate"):
            self.sampling.seed = self.config.seed * 1_000_003 + iteration
            completions = self.engine.generate([p.token_ids for p in prompts], self.sampling)
        with timer("judge"):
            pairs, metrics = self.judge(prompts, completions)
        if pairs:
            with timer("train"):
                batch = make_pair_batch(pairs, self.pad_token_id)
                train_metrics = train_pairs(self.learner, batch, self.objective)
                metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
                self.counters.optimizer_steps = self.learner.num_steps
            with timer("sync"):
                self.engine.update_weights(self.learner.named_weights())
        every, last = self.config.eval.every, self.config.num_iterations
        if iteration == last or (every > 0 and iteration % every == 0):
            with timer("eval"):
                metrics.update(self.evaluate())
        return self.log(metrics, timer)

    def judge(self, prompts: list[Prompt], completions: list[Completion]) -> tuple[list[PreferencePair], dict]:
        """Pick one pair per prompt, get its preference from the oracle, keep the labelled ones."""
        n = self.sampling.n
        groups = [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
        candidates, oracle_metrics, num_queries = self.select_pairs(prompts, groups, self.oracle, self.rng)
        pairs, metrics = to_pairs(candidates)
        c = self.counters
        c.prompts += len(prompts)
        c.samples += len(completions)
        c.generated_tokens += sum(x.num_tokens for x in completions)
        c.oracle_queries += num_queries
        c.pairs += len(candidates)
        c.trained_pairs += len(pairs)
        c.tied_pairs += int(metrics["pref/tied"])
        c.unjudged_pairs += int(metrics["pref/unjudged"])
        lengths = [x.num_tokens for x in completions]
        metrics.update({
            "rollout/generated_tokens": float(sum(lengths)), "rollout/response_tokens_mean": _mean(lengths),
            "rollout/truncated_fraction": _mean([x.finish_reason == "length" for x in completions]),
            **oracle_metrics,
        })
        return pairs, metrics

    def evaluate(self) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        cfg = self.config.eval
        result = evaluate_win_rate(self.engine, self.oracle, self.eval_prompts, self.eval_references,
                                   max_tokens=cfg.max_tokens or self.config.rollout.max_tokens,
                                   stop=list(self.config.rollout.stop))
        self.counters.eval_oracle_queries += len(self.eval_prompts)
        samples_dir = self.run_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        with open(samples_dir / f"eval_{self.counters.iteration:05d}.jsonl", "w") as f:
            for row in result.samples:
                f.write(json.dumps(row) + "\n")
        return result.metrics

    def log(self, metrics: dict[str, float], timer: PhaseTimer) -> dict[str, float]:
        row = {**metrics, **self.counters.as_metrics(), **{f"time/{k}": s for k, s in timer.seconds.items()},
               "time/iteration": sum(timer.seconds.values())}
        self.logger.log(row, step=self.counters.iteration)
        self.history.append(row)
        if self.progress is not None:
            self.progress.update(0 if self.counters.iteration == 0 else 1)
            shown = {k.split("/")[-1]: row[k] for k in ("train/loss", "eval/win_rate") if k in row}
            self.progress.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        return row
