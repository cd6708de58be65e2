"""The oracle service's settings, shared by its launcher (`winnow.oracles.serve`) and its Mosec workers
(`winnow.oracles.service`): the launcher puts the resolved `ServeConfig` in the environment, and each worker,
started by Mosec with no arguments, reads it back. Pure Python: no Mosec, no torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from winnow.oracles.config import OracleConfig, unused_oracle_settings

SERVED_KINDS = ("rule", "reward_model", "pairwise")
"""the oracle kinds a service can run in its workers"""
MODEL_KINDS = ("reward_model", "pairwise")
"""the served kinds that hold a model (tokenised in the ingress, packed by a token budget in the worker)"""

CONFIG_ENV = "WINNOW_SERVE_CONFIG"
"""the environment variable that carries the resolved ServeConfig (JSON) to Mosec's worker processes"""


@dataclass
class ServeConfig:
    """An oracle service: which oracle it serves, where, and how it batches."""

    oracle: OracleConfig = field(default_factory=OracleConfig)
    """the oracle each worker runs in-process: the rule kind (--oracle.rule.rewards, weights, math grader), the
    reward_model kind (--oracle.reward-model.path, a sequence-classification model) or the pairwise kind
    (--oracle.pairwise.path, a pairwise preference model: /compare only)"""
    host: str = "127.0.0.1"
    """address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface (set a token then)"""
    port: int = 8000
    """HTTP port"""
    health_port: int | None = None
    """port of the `GET /health` responder beside the service (Mosec's own routes answer POST only); None: port + 1,
    0: no responder"""
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
    token_budget: int = 16384
    """reward_model and pairwise kinds: the most padded tokens (rows x padded length) in one forward of the model; a worker's
    batch of requests runs in as many forwards as this needs (see `winnow.oracles.model_service`)"""
    pad_bucket: int = 16
    """reward_model and pairwise kinds: each forward pads its rows to a multiple of this many tokens"""
    gpus_per_worker: int = 1
    """reward_model and pairwise kinds: GPUs per worker; more than 1 places the model's layers over them (pipeline parallel)"""
    log_level: str = "info"
    """Mosec's log level: debug, info, warning or error"""

    def __post_init__(self) -> None:
        problems = []
        if self.oracle.kind not in SERVED_KINDS:
            problems.append(f"--oracle.kind {self.oracle.kind}: a service serves the rule kind (reward functions in "
                            f"its workers), the reward_model kind (--oracle.reward-model.path) or the pairwise kind "
                            f"(--oracle.pairwise.path); name its rewards with --oracle.rule.rewards and leave "
                            f"--oracle.kind and --oracle.url (--oracle.remote.url) unset, or serve a model with "
                            f"--oracle.kind reward_model or pairwise")
        else:
            unused = unused_oracle_settings(self.oracle, OracleConfig())
            if unused:
                problems.append(f"a service serves the {self.oracle.kind} kind and does not use {', '.join(unused)}")
        for name in ("max_batch_size", "max_wait_ms", "max_items_per_request", "max_request_bytes",
                     "queue_capacity", "port", "token_budget", "pad_bucket", "gpus_per_worker"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.health_port is not None and (self.health_port < 0 or self.health_port == self.port):
            problems.append(f"--health-port {self.health_port} must be a free port other than --port (0: none)")
        if self.num_workers is not None and self.num_workers < 1:
            problems.append(f"num_workers={self.num_workers} must be >= 1 (or None: one per GPU)")
        if self.timeout_s <= 0 or self.compare_temperature <= 0:
            problems.append("timeout_s and compare_temperature must be > 0")
        if self.log_level not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level={self.log_level!r}: use debug, info, warning or error")
        if problems:
            raise ValueError("invalid ServeConfig: " + "; ".join(problems))


def served_model(oracle: OracleConfig):
    """The settings (path, max_length) of the model a reward_model or pairwise service serves."""
    return oracle.pairwise if oracle.kind == "pairwise" else oracle.reward_model


def load_config_from_env() -> ServeConfig:
    """The ServeConfig `serve` left in the environment (Mosec starts workers with no arguments)."""
    data = json.loads(os.environ[CONFIG_ENV])
    return ServeConfig(**{**data, "oracle": OracleConfig.from_dict(data["oracle"])})
