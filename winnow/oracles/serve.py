"""`winnow serve-oracle`: any in-process oracle as a Mosec service, so several runs can share one.

The service is a two-stage Mosec pipeline per route:

    POST /reward  ─► RewardIngress  ─┐
    POST /compare ─► CompareIngress ─┼─► OracleWorker × num_workers (dynamic batching) ─► reply
    POST /health  ─► HealthIngress  ─┘

Why two stages: Mosec fails a whole dynamic batch when any request in it fails to decode, so one client's
malformed request would refuse every request batched with it. The ingress stages take one request at a
time (no batching): they decode it, check the token and the limits, and refuse a bad one with a 4xx
alone, before it reaches the oracle. The oracle stage then scores every request of a batch in one call to
the oracle (one grader-pool map, one reward-model forward) and splits the scores back.

`score_requests` is that batch logic, pure and testable without a server; `serve` starts Mosec.

Shutdown (SIGTERM or SIGINT to the `winnow serve-oracle` process): Mosec stops its HTTP front end, then its
workers; each oracle worker's math-grader processes exit when their parent's pipe closes. A `kill -9` of the
process takes the front end and every worker with it (PR_SET_PDEATHSIG, Linux), so the port is free again. Mosec restarts a
worker that dies while others of its stage live, but stops the service when all of them have died: run it
under a supervisor that restarts it. Clients wait for it meanwhile (see `winnow.oracles.remote`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from winnow.oracles import OracleConfig

if TYPE_CHECKING:  # winnow.oracles.base imports torch, which the ingress workers need not load
    from winnow.oracles.base import RewardOracle

log = logging.getLogger(__name__)

CONFIG_ENV = "WINNOW_SERVE_CONFIG"
"""the environment variable that carries the resolved ServeConfig (JSON) to Mosec's worker processes"""


@dataclass
class ServeConfig:
    """An oracle service: which oracle it serves, where, and how it batches."""

    oracle: OracleConfig = field(default_factory=OracleConfig)
    """the oracle each worker runs in-process (rewards, weights, math grader); its `url` must stay unset"""
    host: str = "127.0.0.1"
    """address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface (set a token then)"""
    port: int = 8000
    """HTTP port"""
    max_batch_size: int = 64
    """requests the oracle stage takes per call (Mosec's dynamic batching); each request holds up to
    max_items_per_request completions, all scored in one oracle call"""
    max_wait_ms: int = 10
    """how long a batch waits for more requests before it runs, in milliseconds"""
    num_workers: int | None = None
    """oracle worker processes, each with its own copy of the oracle; None: one per visible GPU, or 1
    without GPUs (worker i sees GPU i mod the GPU count through CUDA_VISIBLE_DEVICES)"""
    max_items_per_request: int = 1024
    """the most completions one request may carry; a larger one is refused with 422"""
    max_request_bytes: int = 16 * 1024 * 1024
    """the largest request body; a larger one is refused with 413"""
    timeout_s: float = 120.0
    """seconds one request may take in the service (queue and scoring); past it the reply is 408"""
    queue_capacity: int = 1024
    """requests waiting in the service beyond which new ones are refused with 429 (clients back off)"""
    token_env: str = "WINNOW_ORACLE_TOKEN"
    """environment variable holding the token clients must send; unset or empty: no token is required"""
    compare_temperature: float = 1.0
    """/compare returns sigmoid((r_a - r_b) / compare_temperature), Bradley-Terry on the served rewards"""
    log_level: str = "info"
    """Mosec's log level: debug, info, warning or error"""

    def __post_init__(self) -> None:
        problems = []
        if self.oracle.url is not None:
            problems.append(f"oracle.url={self.oracle.url!r}: a service serves an in-process oracle; name its "
                            f"rewards with --oracle.rewards and leave --oracle.url unset")
        for name in ("max_batch_size", "max_wait_ms", "max_items_per_request", "max_request_bytes",
                     "queue_capacity", "port"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_workers is not None and self.num_workers < 1:
            problems.append(f"num_workers={self.num_workers} must be >= 1 (or None: one per GPU)")
        if self.timeout_s <= 0 or self.compare_temperature <= 0:
            problems.append("timeout_s and compare_temperature must be > 0")
        if self.log_level not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level={self.log_level!r}: use debug, info, warning or error")
        if problems:
            raise ValueError("invalid ServeConfig: " + "; ".join(problems))


def load_config_from_env() -> ServeConfig:
    """The ServeConfig `serve` left in the environment (Mosec starts workers with no arguments)."""
    data = json.loads(os.environ[CONFIG_ENV])
    return ServeConfig(**{**data, "oracle": OracleConfig(**data["oracle"])})


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


def bradley_terry(reward_a: float | None, reward_b: float | None, temperature: float = 1.0) -> float | None:
    """P(a beats b) = sigmoid((r_a - r_b) / temperature); None when either side is unscored."""
    if reward_a is None or reward_b is None:
        return None
    x = (reward_a - reward_b) / temperature
    # the two branches keep exp() from overflowing for large |x|
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def num_visible_gpus() -> int:
    """GPUs this process may use; 0 without an NVIDIA driver (and without importing torch then)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    import torch

    return torch.cuda.device_count()


def _tie_controller_to_this_process() -> None:
    """Start Mosec's HTTP controller (a separate binary) so that Linux kills it when this process dies, as the
    oracle workers kill themselves (`die_with_parent`): a `kill -9` of `winnow serve-oracle` then frees the
    port instead of leaving the service running orphaned. Mosec 0.9 starts it with `subprocess.Popen` in
    `mosec.runtime`; only that module's name is rebound, to a Popen that sets PR_SET_PDEATHSIG first."""
    import functools
    import subprocess
    import types

    from mosec import runtime

    from winnow.oracles.workers import die_with_parent

    if isinstance(getattr(runtime, "subprocess", None), types.ModuleType) and sys.platform.startswith("linux"):
        runtime.subprocess = types.SimpleNamespace(  # type: ignore[attr-defined]
            Popen=functools.partial(subprocess.Popen, preexec_fn=die_with_parent))


def serve(config: ServeConfig) -> None:
    """Run the service until SIGTERM or SIGINT (Mosec then stops its workers)."""
    try:
        from mosec import Runtime, Server

        from winnow.oracles import service
    except ImportError as e:
        raise SystemExit(f"winnow serve-oracle needs Mosec and msgpack ({e}); pip install 'winnow[serve]'") from e
    if not os.environ.get(config.token_env):
        where = "anyone who can reach it" if config.host in ("127.0.0.1", "localhost", "::1") else \
            "ANY MACHINE that can reach it"
        log.warning("no token in $%s: %s:%d answers %s; export %s=<secret> on the server and its clients to "
                    "require one", config.token_env, config.host, config.port, where, config.token_env)
    num_gpus = num_visible_gpus()
    num_workers = config.num_workers or max(1, num_gpus)
    env = [{"CUDA_VISIBLE_DEVICES": str(i % num_gpus)} for i in range(num_workers)] if num_gpus else None
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    # Mosec reads its settings from sys.argv (argparse, unknown flags ignored): hand it exactly these.
    sys.argv = [sys.argv[0], "--address", config.host, "--port", str(config.port),
                "--timeout", str(int(config.timeout_s * 1000)), "--max-request-size", str(config.max_request_bytes),
                "--capacity", str(config.queue_capacity), "--log-level", config.log_level,
                "--namespace", "winnow_oracle"]
    _tie_controller_to_this_process()
    server = Server()
    oracle_stage = Runtime(service.OracleWorker, num=num_workers, max_batch_size=config.max_batch_size,
                           max_wait_time=config.max_wait_ms, timeout=config.timeout_s, env=env)
    server.register_runtime({
        "/reward": [Runtime(service.RewardIngress), oracle_stage],
        "/compare": [Runtime(service.CompareIngress), oracle_stage],
        "/health": [Runtime(service.HealthIngress), oracle_stage],
    })
    log.info("serving %s on http://%s:%d with %d oracle worker(s) (%d GPU(s)), batches of up to %d requests "
             "waiting %d ms", config.oracle.rewards, config.host, config.port, num_workers, num_gpus,
             config.max_batch_size, config.max_wait_ms)
    server.run()
