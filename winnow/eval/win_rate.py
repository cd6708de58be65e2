"""Win rate of the policy against reference responses, judged by a preference oracle.

The policy answers each held-out prompt greedily; the oracle compares that answer with the dataset's
reference response. A win counts 1, a loss 0 and a tie (probability exactly 0.5) 0.5, as in AlpacaEval;
`eval/win_probability` is the mean of the oracle's probabilities themselves. Prompts the oracle could not
judge are counted in `eval/win_rate_unjudged` and left out, never counted as losses.

Best-of-N (`evaluate_best_of_n`, SEA's evaluation): the policy samples N responses per prompt, a reward model
(SEA's ensemble, through `pick`) chooses one, and that choice plays the reference; beside it, the first of the N
samples (a plain sample, no choice) plays the reference too, so the gain of choosing is measured on the same
samples.
"""
from __future__ import annotations

from typing import Callable

from winnow.engines.base import Engine
from winnow.eval.accuracy import EvalResult
from winnow.oracles.base import PreferenceOracle
from winnow.types import Completion, Prompt, SamplingParams

Pick = Callable[[list[Prompt], list[list[Completion]]], list[int]]
"""(prompts, each prompt's N responses) -> the index of the response chosen for each prompt"""


def reference_responses(prompts: list[Prompt], column: str | None) -> list[str]:
    """Each prompt's reference response: its `column` value, or its reference answer when `column` is None."""
    out = []
    for p in prompts:
        value = p.reference if column is None else p.columns.get(column)
        if value is None:
            where = "a reference answer (--data.answer-column)" if column is None else f"a {column!r} column"
            raise ValueError(f"eval prompt {p.index} ({p.text[:40]!r}) has no {where}: win rate compares the "
                             f"policy with a reference response; set --eval.reference-column to the column that "
                             f"holds them")
        out.append(str(value))
    return out


def evaluate_win_rate(
    engine: Engine,
    oracle: PreferenceOracle,
    prompts: list[Prompt],
    references: list[str],
    *,
    max_tokens: int,
    stop: list[str] | None = None,
    num_samples_kept: int = 16,
) -> EvalResult:
    """Greedy responses to `prompts` against `references` (one per prompt). Returns `eval/win_rate` and friends."""
    completions = engine.generate([p.token_ids for p in prompts], SamplingParams(temperature=0.0,
                                  max_tokens=max_tokens, stop=stop or []))
    columns = {key: [p.columns.get(key) for p in prompts] for key in prompts[0].columns} if prompts else {}
    result = oracle.compare([p.text for p in prompts], [c.text for c in completions], references,
                            [p.reference for p in prompts], columns)
    judged = [p for p in result.probabilities if p is not None]
    metrics = {
        "eval/win_rate": win_rate(judged),
        "eval/win_probability": sum(judged) / max(len(judged), 1),
        "eval/tie_rate": sum(p == 0.5 for p in judged) / max(len(judged), 1),
        "eval/win_rate_unjudged": float(result.num_failed),
        "eval/response_tokens": sum(c.num_tokens for c in completions) / max(len(completions), 1),
        **{f"eval/{k}": v for k, v in result.metrics.items()},
    }
    samples = [{"prompt": p.text, "response": c.text, "reference_response": ref, "probability": prob}
               for p, c, ref, prob in list(zip(prompts, completions, references, result.probabilities))
               [:num_samples_kept]]
    return EvalResult(metrics, samples)


def win_rate(probabilities: list[float | None]) -> float:
    """Wins 1, ties 0.5, losses 0, over the judged probabilities (unjudged left out)."""
    wins = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p in probabilities if p is not None]
    return sum(wins) / max(len(wins), 1)


def evaluate_best_of_n(
    engine: Engine,
    oracle: PreferenceOracle,
    prompts: list[Prompt],
    references: list[str],
    *,
    pick: Pick,
    n: int,
    max_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
) -> EvalResult:
    """N sampled responses per prompt; `pick` chooses one each, which plays the reference. Returns
    `eval/best_of_n_win_rate` (the choices), `eval/sample_win_rate` (the first sample of each prompt, unchosen)
    and `eval/best_of_n_pick_is_first` (how often the choice was that sample). Costs 2 oracle queries a prompt."""
    if n < 2:
        raise ValueError(f"best-of-n needs n >= 2 samples per prompt, got {n} (--eval.best-of-n)")
    if not prompts:
        return EvalResult({}, [])
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=n, seed=seed, stop=stop or [])
    completions = engine.generate([p.token_ids for p in prompts], params)
    groups = [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
    picks = pick(prompts, groups)
    chosen, first = [g[k].text for g, k in zip(groups, picks)], [g[0].text for g in groups]
    texts = [p.text for p in prompts]
    answers = [p.reference for p in prompts]
    columns = {key: [p.columns.get(key) for p in prompts] * 2 for key in prompts[0].columns}
    judged = oracle.compare(texts + texts, chosen + first, references + references, answers + answers, columns)
    probabilities = judged.probabilities
    metrics = {"eval/best_of_n_win_rate": win_rate(probabilities[:len(prompts)]),
               "eval/sample_win_rate": win_rate(probabilities[len(prompts):]),
               "eval/best_of_n_pick_is_first": sum(k == 0 for k in picks) / len(picks),
               "eval/best_of_n_unjudged": float(sum(p is None for p in probabilities))}
    samples = [{"prompt": p.text, "best_of_n": c, "first_sample": f, "reference_response": r}
               for p, c, f, r in list(zip(prompts, chosen, first, references))[:16]]
    return EvalResult(metrics, samples)
