"""`winnow serve-oracle`: any in-process oracle as a Mosec service, so several runs can share one.

The service is a two-stage Mosec pipeline per route:

    POST /reward  ─► RewardIngress  ─┐
    POST /compare ─► CompareIngress ─┼─► OracleWorker × num_workers (dynamic batching) ─► reply
    POST /health  ─► HealthIngress  ─┘
    GET  /health on --health-port  ─► POST /health above, answered as JSON (200, or 503 with why)

Why two stages: Mosec fails a whole dynamic batch when any request in it fails to decode, so one client's
malformed request would refuse every request batched with it. The ingress stages take one request at a
time (no batching): they decode it, check the token and the limits, and refuse a bad one with a 4xx
alone, before it reaches the oracle. The oracle stage then scores every request of a batch in one call to
the oracle (one grader-pool map, one reward-model forward) and splits the scores back.

`GET /health`: Mosec 0.9.8's front end routes POST only (its own GET routes are `/`, `/metrics` and
`/openapi/...`), so a load balancer's or Kubernetes' HTTP probe gets 405 there. A small HTTP server in this
process, on `--health-port` (default: the service port + 1), answers `GET /health` by asking the pipeline
itself (`POST /health` through the ingress and an oracle worker), so 200 means the workers answer, not only
that the front end is up. It lives and dies with this process.

Modules, each importing only the ones below it: `serve` (this one: the launcher, `winnow serve-oracle`) starts
Mosec with the workers of `service` (the stages above, and `score_requests`, the oracle stage's batch logic,
testable without a server); both read the settings from `service_config` (`ServeConfig`), and the requests'
format from `wire`.

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
import os
import shutil
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from winnow.oracles.service_config import CONFIG_ENV, MODEL_KINDS, ServeConfig, served_model

__all__ = ["ServeConfig", "num_visible_gpus", "pipeline_health", "serve", "start_health_responder"]

log = logging.getLogger(__name__)


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
    _check_mosec_binary()
    stages = _stages(config.oracle.kind)
    _check_ipc_path(stages)
    if not os.environ.get(config.token_env):
        where = "anyone who can reach it" if config.host in ("127.0.0.1", "localhost", "::1") else \
            "ANY MACHINE that can reach it"
        log.warning("no token in $%s: %s:%d answers %s; export %s=<secret> on the server and its clients to "
                    "require one", config.token_env, config.host, config.port, where, config.token_env)
    num_gpus = num_visible_gpus()
    k = config.gpus_per_worker if config.oracle.kind in MODEL_KINDS else 1
    num_workers = config.num_workers or max(1, num_gpus // k)
    env = [{"CUDA_VISIBLE_DEVICES": ",".join(str((i * k + j) % num_gpus) for j in range(k))}
           for i in range(num_workers)] if num_gpus else None
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    # Mosec reads its settings from sys.argv (argparse, unknown flags ignored): hand it exactly these.
    sys.argv = [sys.argv[0], "--address", config.host, "--port", str(config.port),
                "--timeout", str(int(config.timeout_s * 1000)), "--max-request-size", str(config.max_request_bytes),
                "--capacity", str(config.queue_capacity), "--log-level", config.log_level,
                "--namespace", "winnow_oracle"]
    _tie_controller_to_this_process()
    start_health_responder(config)
    server = Server()
    oracle_stage = Runtime(stages["worker"], num=num_workers, max_batch_size=config.max_batch_size,
                           max_wait_time=config.max_wait_ms, timeout=config.timeout_s, env=env)
    server.register_runtime({
        "/reward": [Runtime(stages["reward"]), oracle_stage],
        "/compare": [Runtime(stages["compare"]), oracle_stage],
        "/health": [Runtime(service.HealthIngress), oracle_stage],
    })
    served = config.oracle.rule.rewards if config.oracle.kind == "rule" else served_model(config.oracle).path
    log.info("serving %s on http://%s:%d with %d oracle worker(s) (%d GPU(s)), batches of up to %d requests "
             "waiting %d ms", served, config.host, config.port, num_workers, num_gpus, config.max_batch_size,
             config.max_wait_ms)
    server.run()


SOCKET_PATH_MAX = 107  # a Unix socket's path on Linux: sun_path's 108 bytes, less the terminating NUL


def _check_ipc_path(stages: dict) -> None:
    """Mosec's processes talk over Unix sockets named MOSEC_PATH/ipc_STAGE_N.socket (MOSEC_PATH unset: a folder
    in /tmp). A path past the sockets' limit fails inside Mosec with a panic ("path must be shorter than
    SUN_LEN") and a server that never answers."""
    from winnow.oracles import service

    folder = os.environ.get("MOSEC_PATH")
    if not folder:
        return
    names = [stage.__name__ for stage in (*stages.values(), service.HealthIngress)]
    longest = max(len(os.path.join(folder, f"ipc_{name}_99.socket")) for name in names)
    if longest > SOCKET_PATH_MAX:
        raise SystemExit(f"winnow serve-oracle: MOSEC_PATH={folder} is too long for the sockets Mosec makes in it "
                         f"({longest} characters, past a Unix socket's {SOCKET_PATH_MAX}); point MOSEC_PATH at a "
                         "shorter folder, or unset it (Mosec then makes one in /tmp)")


def _check_mosec_binary() -> None:
    """Mosec starts its server binary from this Python's scripts directory only; a Mosec installed elsewhere
    (`pip install --target DIR`, which puts the binary in DIR/bin) would fail later with a bare "No such file or
    directory: 'None'"."""
    try:
        from mosec.utils import get_mosec_path
    except ImportError:  # another Mosec layout: let it find its binary its own way
        return
    if get_mosec_path() is None:
        import sysconfig

        raise SystemExit("winnow serve-oracle: Mosec's server binary `mosec` is not in this Python's scripts "
                         f"directory ({sysconfig.get_path('scripts')}), the only place Mosec looks for it; install "
                         "mosec with pip into this environment (not with --target), or copy its bin/mosec there")


def start_health_responder(config: ServeConfig) -> ThreadingHTTPServer | None:
    """Serve `GET /health` on the health port in a daemon thread of this process (None when it is 0)."""
    port = config.port + 1 if config.health_port is None else config.health_port
    if port == 0:
        return None
    try:
        server = ThreadingHTTPServer((config.host, port), _HealthHandler)
    except OSError as e:
        message = f"cannot serve GET /health on {config.host}:{port} ({e}); choose another --health-port (0: none)"
        if config.health_port is None:  # the default port is taken: serve without it rather than not at all
            log.warning("%s; serving without GET /health", message)
            return None
        raise SystemExit(f"winnow serve-oracle: {message}") from None
    server.pipeline_url = f"http://{_loopback(config.host)}:{config.port}/health"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="winnow-health", daemon=True).start()
    log.info("GET /health on http://%s:%d/health", config.host, port)
    return server


def pipeline_health(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a health probe: `POST url` (the pipeline's /health) and its msgpack reply as
    200, or 503 with the reason when the front end or the oracle workers do not answer within `timeout_s`."""
    import msgpack

    request = urllib.request.Request(url, data=msgpack.packb({}), method="POST")  # Mosec ignores empty bodies
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return 200, msgpack.unpackb(response.read(), raw=False)
    except urllib.error.HTTPError as e:
        return 503, {"status": "unavailable", "error": f"POST /health answered HTTP {e.code}"}
    except (OSError, ValueError) as e:  # refused, reset, timed out; or a reply that is not msgpack
        return 503, {"status": "unavailable", "error": f"the oracle pipeline did not answer: {e}"}


class _HealthHandler(BaseHTTPRequestHandler):
    """`GET /health` -> `pipeline_health`; any other path is 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] != "/health":
            self._reply(404, {"error": f"no route {self.path}: GET /health"})
            return
        self._reply(*pipeline_health(self.server.pipeline_url))  # type: ignore[attr-defined]

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a probe every few seconds would flood the service's log."""


def _loopback(host: str) -> str:
    """Where this process reaches the service it bound on `host` (a wildcard address: the loopback)."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _stages(kind: str) -> dict:
    """The ingress and worker classes of `kind`: reward functions (`service`), a reward model or a pairwise model
    (`model_service`, which tokenises in the ingress and packs the forward by a token budget)."""
    from winnow.oracles import service

    if kind == "pairwise":
        from winnow.oracles import model_service

        return {"reward": model_service.PairwiseRewardIngress, "compare": model_service.PairwiseCompareIngress,
                "worker": model_service.RewardModelWorker}
    if kind == "reward_model":
        from winnow.oracles import model_service

        return {"reward": model_service.ModelRewardIngress, "compare": model_service.ModelCompareIngress,
                "worker": model_service.RewardModelWorker}
    return {"reward": service.RewardIngress, "compare": service.CompareIngress, "worker": service.OracleWorker}
