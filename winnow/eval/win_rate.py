"""Win rate of the policy against reference responses, judged by a preference oracle.

The policy answers each held-out prompt greedily; the oracle compares that answer with the dataset's
reference response. A win counts 1, a loss 0 and a tie (probability exactly 0.5) 0.5, as in AlpacaEval;
`eval/win_probability` is the mean of the oracle's probabilities themselves. Prompts the oracle could not
judge are counted in `eval/win_rate_unjudged` and left out, never counted as losses.
"""
from __future__ import annotations

from winnow.engines.base import Engine
from winnow.eval.accuracy import EvalResult
from winnow.oracles.base import PreferenceOracle
from winnow.types import Prompt, SamplingParams


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
    wins = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p in judged]
    metrics = {
        "eval/win_rate": sum(wins) / max(len(wins), 1),
        "eval/win_probability": sum(judged) / max(len(judged), 1),
        "eval/tie_rate": sum(w == 0.5 for w in wins) / max(len(wins), 1),
        "eval/win_rate_unjudged": float(result.num_failed),
        "eval/response_tokens": sum(c.num_tokens for c in completions) / max(len(completions), 1),
        **{f"eval/{k}": v for k, v in result.metrics.items()},
    }
    samples = [{"prompt": p.text, "response": c.text, "reference_response": ref, "probability": prob}
               for p, c, ref, prob in list(zip(prompts, completions, references, result.probabilities))
               [:num_samples_kept]]
    return EvalResult(metrics, samples)
