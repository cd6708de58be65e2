"""`RemoteOracle`: a `RewardOracle` that scores on an oracle service (`winnow serve-oracle`).

What it consumes: one `reward()` call, N completions. What it waits for: every chunk's reply. It splits
the call into requests of `request_batch_size` completions, keeps up to `max_in_flight` of them in flight
(one thread each, each with its own keep-alive connection), and places each reply's scores by index.

Failures, by kind:
- the service is unreachable, overloaded or failing (connection refused or reset, a timeout, HTTP 408,
  429 or 5xx): the request is sent again after an exponential backoff with full jitter, for as long as the
  service has been unreachable for less than `give_up_after_s`. Meanwhile `reward()` does not return, so
  the actor is paused (never training on missing scores); a log line says so every `log_every_s`, and the
  time spent is reported as `oracle/paused_s`. Past the deadline, `OracleUnavailableError` says what
  happened.
- the service refuses a request (any other 4xx, or an error reply): that is a bug on our side (a missing
  token, an over-limit request, no reference answers for `math`), so it is raised at once, with the
  service's message, never retried.

Exactly once: each chunk belongs to one thread, which sends it until one reply is accepted; a reply that
arrives after its request timed out is never read (its connection is closed first), and a reply whose id
is not the request's is refused. So every completion's score comes from exactly one accepted reply. The
service may have scored a chunk twice (a reply lost in an outage): that costs time, never a sample.
"""
from __future__ import annotations

import http.client
import itertools
import logging
import math
import os
import random
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from winnow.types import RewardResult

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
"""HTTP statuses that mean "not now" (timeout, busy, down): retried until the deadline"""


class OracleUnavailableError(RuntimeError):
    """The oracle service stayed unreachable past `give_up_after_s`."""


class OracleRequestError(RuntimeError):
    """The oracle service refused a request (4xx or an error reply): a bug to fix, not retried."""


class _Retry(Exception):
    """A failure worth retrying: the service is down, busy or timed out."""


class _Outage:
    """Whether the service is down, since when, and for how long in total; shared by the request threads.

    The service counts as down from a request's first failure until any request succeeds."""

    def __init__(self, url: str, give_up_after_s: float, log_every_s: float) -> None:
        self.url, self.give_up_after_s, self.log_every_s = url, give_up_after_s, log_every_s
        self.lock = threading.Lock()
        self.down_since: float | None = None  # time.monotonic()
        self.down_since_wall = 0.0
        self.last_log = -math.inf
        self.paused_total_s = 0.0

    def failed(self, error: str) -> None:
        """Record a failure; raise OracleUnavailableError once the outage is older than the deadline."""
        with self.lock:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since, self.down_since_wall = now, time.time()
            down_for = now - self.down_since
            since = time.strftime("%H:%M:%S", time.localtime(self.down_since_wall))
            if down_for > self.give_up_after_s:
                raise OracleUnavailableError(
                    f"oracle service at {self.url} unreachable since {since} ({down_for:.0f} s), past "
                    f"give_up_after_s={self.give_up_after_s:g} (--oracle.remote.give-up-after-s); last error: {error}. "
                    f"Start it (winnow serve-oracle ...) or fix --oracle.remote.url, then resume the run")
            if now - self.last_log >= self.log_every_s:
                self.last_log = now
                log.warning("oracle at %s unreachable since %s (%.0f s), actor paused; retrying (gives up after "
                            "%g s): %s", self.url, since, down_for, self.give_up_after_s, error)

    def recovered(self) -> None:
        with self.lock:
            if self.down_since is not None:
                down_for = time.monotonic() - self.down_since
                self.paused_total_s += down_for
                self.down_since, self.last_log = None, -math.inf
                log.warning("oracle at %s is back after %.1f s; actor resumed", self.url, down_for)

    def paused_s(self) -> float:
        """Seconds spent with the service down, over this client's life, the current outage included."""
        with self.lock:
            ongoing = 0.0 if self.down_since is None else time.monotonic() - self.down_since
            return self.paused_total_s + ongoing


class RemoteOracle:
    """Scores on an oracle service; see the module docstring for batching, retries and exactly-once."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0,
                 give_up_after_s: float = 600.0, max_in_flight: int = 4, request_batch_size: int = 64,
                 backoff_base_s: float = 0.1, backoff_max_s: float = 2.0, log_every_s: float = 10.0) -> None:
        try:
            import msgpack
        except ImportError as e:
            raise ImportError("the remote oracle needs msgpack: pip install 'winnow[serve]'") from e
        self._msgpack = msgpack
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"oracle url {url!r} must look like http://HOST:PORT")
        self.url = url.rstrip("/")
        self._https, self._host = parts.scheme == "https", parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base_path = parts.path.rstrip("/")
        self.token, self.timeout_s = token, timeout_s
        self.max_in_flight, self.request_batch_size = max_in_flight, request_batch_size
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.outage = _Outage(self.url, give_up_after_s, log_every_s)
        self.num_requests = 0
        """requests whose reply was accepted, over this client's life"""
        self.num_retries = 0
        """requests sent again after a failure, over this client's life"""
        self._ids = itertools.count()
        self._session = uuid.uuid4().hex[:8]
        self._counter_lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="winnow-oracle")

    @classmethod
    def from_config(cls, config: Any) -> RemoteOracle:
        """From a `RemoteOracleConfig` (`OracleConfig.remote`); the token comes from the variable `token_env` names."""
        return cls(config.url, token=os.environ.get(config.token_env) or None, timeout_s=config.timeout_s,
                   give_up_after_s=config.give_up_after_s, max_in_flight=config.max_in_flight,
                   request_batch_size=config.request_batch_size)

    # ------------------------------------------------------------------ the oracle's API

    def reward(self, prompts: list[str], completions: list[str], references: list[str | None],
               columns: dict[str, list[Any]] | None = None) -> RewardResult:
        start, paused_before, retries_before = time.perf_counter(), self.outage.paused_s(), self.num_retries
        fields = {"prompts": list(prompts), "completions": list(completions), "references": list(references),
                  **{f"columns.{k}": list(v) for k, v in (columns or {}).items()}}
        replies = self._call("reward", fields)
        scores: list[float | None] = []
        components: dict[str, list[float | None]] = {}
        for reply in replies:
            for name, values in reply.get("components", {}).items():
                components.setdefault(name, []).extend(values)
            scores.extend(reply["scores"])
        metrics = {f"oracle/server/{k.removeprefix('oracle/')}": sum(r["metrics"].get(k, 0.0) for r in replies)
                   / len(replies) for k in (replies[0]["metrics"] if replies else {})}
        metrics.update({
            "oracle/latency_s": time.perf_counter() - start,
            "oracle/num_failed": float(sum(s is None for s in scores)),
            "oracle/num_retries": float(self.num_retries - retries_before),
            "oracle/num_requests": float(len(replies)),
            "oracle/paused_s": self.outage.paused_s() - paused_before,
        })
        return RewardResult(scores, components, metrics)

    def compare(self, prompts: list[str], completions_a: list[str], completions_b: list[str],
                references: list[str | None] | None = None) -> list[float | None]:
        """P(completions_a[i] beats completions_b[i]) for each i: sigmoid((r_a - r_b) / T) on the served
        oracle's rewards, T the server's `compare_temperature`; None where either side is unscored.
        The shape the preference-learning protocol asks of a judge."""
        references = list(references) if references is not None else [None] * len(prompts)
        fields = {"prompts": list(prompts), "completions_a": list(completions_a),
                  "completions_b": list(completions_b), "references": references}
        return [p for reply in self._call("compare", fields) for p in reply["probabilities"]]

    def health(self) -> dict[str, Any]:
        """The service's health reply ({"status": "ok", "rewards": [...], "worker": i}); one try, raises."""
        try:
            return self._msgpack.unpackb(self._send("health", b"\x80"), raw=False)  # {}: Mosec refuses empty bodies
        except _Retry as e:
            raise OracleUnavailableError(f"oracle service at {self.url}: {e}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    def _call(self, op: str, fields: dict[str, list]) -> list[dict[str, Any]]:
        """Split `fields` (N entries each) into requests, send them concurrently, and return the replies in
        order. Raises the first request's error, after telling the other threads to stop."""
        n = len(fields["prompts"])
        lengths = {k: len(v) for k, v in fields.items()}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"every argument needs one entry per completion, got lengths {lengths}")
        stop = threading.Event()
        futures = []
        for begin in range(0, n, self.request_batch_size):
            body: dict[str, Any] = {"id": f"{self._session}-{next(self._ids)}", "token": self.token, "columns": {}}
            for key, values in fields.items():
                chunk = values[begin:begin + self.request_batch_size]
                if key.startswith("columns."):
                    body["columns"][key.removeprefix("columns.")] = chunk
                else:
                    body[key] = chunk
            futures.append(self._pool.submit(self._post, op, body, stop))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()
            wait(futures)
            raise failed[0].exception()
        return [f.result() for f in futures]

    def _post(self, op: str, body: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
        """Send one request until its reply is accepted, or the deadline passes, or `stop` is set."""
        payload = self._msgpack.packb(body, use_bin_type=True, default=_plain)
        n = len(body["prompts"])
        for attempt in itertools.count():
            if stop.is_set():
                raise OracleRequestError("cancelled: another request of the same call failed")
            try:
                reply = self._msgpack.unpackb(self._send(op, payload), raw=False)
            except _Retry as e:
                self.outage.failed(str(e))
                with self._counter_lock:
                    self.num_retries += 1
                stop.wait(random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt)))
                continue
            self.outage.recovered()
            return self._accept(op, body["id"], n, reply)
        raise AssertionError("unreachable")

    def _accept(self, op: str, request_id: str, n: int, reply: Any) -> dict[str, Any]:
        if not isinstance(reply, dict) or reply.get("id") != request_id:
            got = reply.get("id") if isinstance(reply, dict) else type(reply).__name__
            raise OracleRequestError(f"oracle service at {self.url} answered request {request_id} with a reply "
                                     f"for {got!r}; is --oracle.remote.url a winnow oracle service?")
        if "error" in reply:
            raise OracleRequestError(f"oracle service at {self.url} could not score a /{op} request: "
                                     f"{reply['error']}")
        key = "scores" if op == "reward" else "probabilities"
        if len(reply.get(key, ())) != n:
            raise OracleRequestError(f"oracle service at {self.url} returned {len(reply.get(key, ()))} {key} for "
                                     f"{n} items")
        with self._counter_lock:
            self.num_requests += 1
        return reply

    def _send(self, op: str, payload: bytes) -> bytes:
        """POST `payload` to /op on this thread's connection; the reply body. Raises _Retry when the service
        is down, busy or slow (the connection is dropped, so a late reply is never read), and
        OracleRequestError when it refuses the request."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = self._local.connection = cls(self._host, self._port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/msgpack"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection.request("POST", f"{self._base_path}/{op}", body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            connection.close()
            self._local.connection = None
            raise _Retry(f"{type(e).__name__}: {e}") from None
        if response.status == 200:
            return data
        message = data.decode(errors="replace").strip()[:1000]
        if response.status in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {response.status}: {message}")
        hint = " (the body is over the service's max_request_bytes; lower --oracle.remote.request-batch-size)" \
            if response.status == 413 else ""
        raise OracleRequestError(f"oracle service at {self.url} refused a /{op} request with HTTP "
                                 f"{response.status}: {message}{hint}")


def _plain(value: Any) -> Any:
    """msgpack's fallback for values it cannot pack: numpy scalars and arrays become Python ones."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} to the oracle service; dataset columns must hold "
                    f"strings, numbers, lists or dicts")
