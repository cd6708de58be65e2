"""The Mosec workers of `winnow serve-oracle` (see `winnow.oracles.serve` for the pipeline and why), and
`score_requests`, the oracle stage's batch logic.

Mosec starts each worker in a fresh process with no arguments, so workers read the resolved ServeConfig
from the environment (`serve` puts it there) and the token from the variable it names.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from typing import TYPE_CHECKING, Any

import msgpack
from mosec import ClientError, ValidationError, Worker
from mosec.mixin import MsgpackMixin

from winnow.oracles import wire
from winnow.oracles.service_config import load_config_from_env
from winnow.oracles.workers import die_with_parent

if TYPE_CHECKING:  # winnow.oracles.base imports torch, which the ingress workers need not load
    from winnow.oracles.base import RewardOracle

log = logging.getLogger(__name__)


class _Ingress(Worker):
    """Decode one request, check its token and limits; refuse it alone (4xx) when something is wrong.

    Status codes: 400 for a body that is not msgpack or lacks the right token (Mosec's workers can
    return 400, 422, 408 and 500 only, so "unauthorized" is a 400 whose message says so); 422 for a
    well-formed request with wrong fields or too many items; 413 (from Mosec) for a body over the size
    limit."""

    op = ""

    def __init__(self) -> None:
        super().__init__()
        die_with_parent()  # a `kill -9` of `winnow serve-oracle` takes this worker with it
        config = load_config_from_env()
        self.token = os.environ.get(config.token_env) or None
        self.max_items = config.max_items_per_request

    def deserialize(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, use_list=True, raw=False)
        except Exception as e:
            raise ClientError(f"the body is not msgpack ({type(e).__name__}: {e}); send a msgpack map, "
                              f"Content-Type application/msgpack") from e

    def forward(self, data: Any) -> dict[str, Any]:
        try:
            wire.check_token(data, self.token)
        except wire.AuthError as e:
            raise ClientError(str(e)) from e
        try:
            return wire.validate(data, self.op, self.max_items)
        except wire.RequestError as e:
            raise ValidationError(str(e)) from e


class RewardIngress(_Ingress):
    op = "reward"


class CompareIngress(_Ingress):
    op = "compare"


class HealthIngress(Worker):
    """Any body, no token: the reply only says the pipeline is up and which rewards it serves."""

    def __init__(self) -> None:
        super().__init__()
        die_with_parent()

    def deserialize(self, data: bytes) -> Any:
        return None

    def forward(self, data: Any) -> dict[str, Any]:
        return {"op": "health", "id": "health"}


class OracleWorker(MsgpackMixin, Worker):
    """Scores a dynamic batch of validated requests with one in-process oracle (see `score_requests`)."""

    def __init__(self) -> None:
        super().__init__()
        die_with_parent()
        from winnow.oracles import make_oracle

        # Mosec starts workers as daemonic processes, which multiprocessing forbids to have children; the
        # math grader's pool needs them. Its processes exit by themselves when this one dies (their pipe
        # closes), which is the guarantee the rule is there for.
        multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
        self.config = load_config_from_env()
        self.oracle = make_oracle(self.config.oracle)
        self.info = {"rewards": list(self.config.oracle.rule.rewards),
                     "reward_weights": self.config.oracle.rule.reward_weights}

    def forward(self, data: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        info = {**self.info, "worker": self.worker_id}
        if isinstance(data, dict):  # max_batch_size=1: Mosec hands over the request itself, not a list
            return score_requests(self.oracle, [data], self.config.compare_temperature, info)[0]
        return score_requests(self.oracle, data, self.config.compare_temperature, info)


def score_requests(oracle: RewardOracle, requests: list[dict[str, Any]], temperature: float = 1.0,
                   info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One reply per validated request (see `wire.validate`), in order.

    Requests with the same dataset columns are scored together in one `oracle.reward` call (a compare
    request contributes its a's then its b's). If that call raises, each request is scored alone, so a
    request that breaks the oracle (no reference answers for `math`) gets its own error reply and the
    others their scores."""
    replies: list[dict[str, Any] | None] = [None] * len(requests)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, request in enumerate(requests):
        if request["op"] == "health":
            replies[i] = {"status": "ok", **(info or {})}
        else:
            groups.setdefault(tuple(sorted(request["columns"])), []).append(i)
    for indices in groups.values():
        try:
            batch = [requests[i] for i in indices]
            for i, reply in zip(indices, _score_together(oracle, batch, temperature)):
                replies[i] = reply
        except Exception:
            for i in indices:
                try:
                    replies[i] = _score_together(oracle, [requests[i]], temperature)[0]
                except Exception as e:  # the request's own fault, or the oracle's: either way, say which
                    log.warning("request %r failed: %r", requests[i]["id"], e)
                    replies[i] = {"id": requests[i]["id"], "error": f"{type(e).__name__}: {e}"}
    return replies  # type: ignore[return-value]  # every slot is filled above


def _score_together(oracle: RewardOracle, requests: list[dict[str, Any]], temperature: float) -> list[dict]:
    prompts, completions, references = [], [], []
    columns: dict[str, list] = {k: [] for k in requests[0]["columns"]}
    spans = []
    for request in requests:
        sides = ["completions"] if request["op"] == "reward" else ["completions_a", "completions_b"]
        start = len(completions)
        for side in sides:
            prompts += request["prompts"]
            completions += request[side]
            references += request["references"]
            for k in columns:
                columns[k] += request["columns"][k]
        spans.append((start, len(completions)))
    # Imported here, not at the top: the ingress workers, which load this module too, need not load torch.
    from winnow.oracles.preference import bradley_terry

    result = oracle.reward(prompts, completions, references, columns)
    replies = []
    for request, (start, end) in zip(requests, spans):
        scores = result.scores[start:end]
        if request["op"] == "reward":
            replies.append({"id": request["id"], "scores": scores, "metrics": result.metrics,
                            "components": {k: v[start:end] for k, v in result.components.items()}})
        else:
            n = (end - start) // 2
            replies.append({"id": request["id"], "metrics": result.metrics,
                            "probabilities": [bradley_terry(a, b, temperature)
                                              for a, b in zip(scores[:n], scores[n:])]})
    return replies
