"""Held-out accuracy of the policy: greedy and mean@k, scored by the run's own oracle."""
from __future__ import annotations

from dataclasses import dataclass

from winnow.engines.base import Engine
from winnow.oracles.base import RewardOracle
from winnow.types import Completion, Prompt, SamplingParams


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """`eval/...` numbers for the log"""
    samples: list[dict]
    """a few greedy (prompt, response, reference, correct) rows to look at"""


def evaluate_accuracy(
    engine: Engine,
    oracle: RewardOracle,
    prompts: list[Prompt],
    *,
    max_tokens: int,
    greedy: bool = True,
    k: int = 0,
    temperature: float = 1.0,
    correct_threshold: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
    num_samples_kept: int = 16,
) -> EvalResult:
    """Accuracy on `prompts`: greedy (one deterministic response each) and mean@k (the mean accuracy of
    k sampled responses each, an unbiased estimate of single-sample accuracy at `temperature`).

    A response is correct when the *first* reward function of the oracle (the verifier; format or shaping
    rewards come after it) gives at least `correct_threshold`. Responses the oracle could not score are
    counted in `eval/<run>_num_unscored` and left out of the mean, never counted as wrong; when none could be
    scored the accuracy is absent, not 0.
    """
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    ids = [p.token_ids for p in prompts]
    runs = []
    if greedy:
        runs.append(("greedy", SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop or [])))
    if k > 0:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=k, seed=seed, stop=stop or [])
        runs.append((f"mean@{k}", params))
    for name, params in runs:
        completions = engine.generate(ids, params)
        repeated = [p for p in prompts for _ in range(params.n)]
        correct = _correct(oracle, repeated, completions, correct_threshold)
        scored = [c for c in correct if c is not None]
        if scored:  # no scored response: no accuracy at all, rather than a made-up 0
            metrics[f"eval/{name}_accuracy"] = sum(scored) / len(scored)
        metrics[f"eval/{name}_response_tokens"] = sum(c.num_tokens for c in completions) / len(completions)
        metrics[f"eval/{name}_num_unscored"] = float(len(correct) - len(scored))
        if name == "greedy":
            samples = [
                {"prompt": p.text, "response": c.text, "reference": p.reference, "correct": ok}
                for p, c, ok in list(zip(repeated, completions, correct))[:num_samples_kept]
            ]
    return EvalResult(metrics, samples)


def _correct(
    oracle: RewardOracle, prompts: list[Prompt], completions: list[Completion], threshold: float
) -> list[bool | None]:
    columns = {key: [p.columns.get(key) for p in prompts] for key in prompts[0].columns} if prompts else {}
    result = oracle.reward(
        [p.text for p in prompts], [c.text for c in completions], [p.reference for p in prompts], columns
    )
    verifier = next(iter(result.components.values()), result.scores)
    return [None if s is None else s >= threshold for s in verifier]
