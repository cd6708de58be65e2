"""Oracle throughput and latency: the Mosec service (dynamic batching on) against the in-process oracle.

    python benchmarks/oracle_throughput.py [--seconds-per-cell 1.5] [--out benchmarks/results]

For each reward (`exact`, a cheap rule; `math`, math-verify in a grader pool) and each cell of the grid
(request batch size × concurrency), `concurrency` threads each call `oracle.reward` on `batch size`
completions, again and again, for about `--seconds-per-cell`. A call is one HTTP request for the remote
oracle (so its latency is a request's round trip), one function call in-process. Reported: completions
scored per second over the cell, call latency p50/p95, and for the service the mean number of requests
Mosec put in one oracle call (from its batch-size histogram on /metrics).

Writes `oracle_throughput.json` (machine, versions, date, every cell) and `oracle_throughput.md` (the
table). Bounded: about two minutes on a 2-core machine. Not a test: numbers move with the machine's load,
which the JSON records.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from winnow.oracles import OracleConfig, RuleOracleConfig, make_oracle  # noqa: E402
from winnow.oracles.remote import OracleUnavailableError, RemoteOracle  # noqa: E402

BATCH_SIZES = (1, 8, 64)
CONCURRENCY = (1, 4, 16)


def workload(reward: str, n: int = 4096) -> tuple[list[str], list[str], list[str]]:
    """n arithmetic problems; half the answers right. `math` gets \\boxed{} answers, some as fractions."""
    rng = random.Random(0)
    prompts, completions, references = [], [], []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        answer = a + b if rng.random() < 0.5 else a + b + 1
        prompts.append(f"What is {a}+{b}?")
        references.append(str(a + b))
        if reward == "math":
            completions.append(rf"{a}+{b} makes \boxed{{{2 * answer}/2}}" if rng.random() < 0.3
                               else rf"The answer is \boxed{{{answer}}}.")
        else:
            completions.append(str(answer))
    return prompts, completions, references


def run_cell(oracle, data, batch_size: int, concurrency: int, seconds: float) -> dict:
    """`concurrency` threads calling `oracle.reward` on `batch_size` items until `seconds` have passed."""
    prompts, completions, references = data
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def caller(offset: int) -> None:
        i = offset * batch_size
        while time.perf_counter() < stop_at:
            j = i % (len(prompts) - batch_size)
            start = time.perf_counter()
            scores = oracle.reward(prompts[j:j + batch_size], completions[j:j + batch_size],
                                   references[j:j + batch_size]).scores
            elapsed = time.perf_counter() - start
            assert len(scores) == batch_size and None not in scores
            with lock:
                latencies.append(elapsed)
            i += concurrency * batch_size

    start = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"batch_size": batch_size, "concurrency": concurrency, "calls": len(latencies),
            "items_per_s": len(latencies) * batch_size / wall,
            "latency_p50_ms": 1000 * latencies[len(latencies) // 2],
            "latency_p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


class Server:
    """`winnow serve-oracle` on a free port of 127.0.0.1, in its own process group."""

    def __init__(self, reward: str, max_batch_size: int, max_wait_ms: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "WINNOW_ORACLE_TOKEN": ""}
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.rule.rewards", reward, "--port",
             str(self.port), "--num-workers", "1", "--max-batch-size", str(max_batch_size), "--max-wait-ms",
             str(max_wait_ms), "--log-level", "warning"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        client, deadline = RemoteOracle(self.url, timeout_s=5), time.monotonic() + 120
        while True:
            try:
                client.health()
                break
            except OracleUnavailableError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log}")
                time.sleep(0.25)
        client.close()

    def batch_histogram(self) -> tuple[float, float]:
        """(oracle-stage batches, requests in them) so far."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=5).read().decode()
        def total(prefix: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(prefix) and 'stage="OracleWorker' in line)
        return total("winnow_oracle_batch_size_count"), total("winnow_oracle_batch_size_sum")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def bench_reward(reward: str, seconds: float) -> list[dict]:
    data = workload(reward)
    rows = []
    local = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=[reward])))
    local.reward(*[x[:8] for x in data])  # start the grader pool outside the timings
    for batch_size in BATCH_SIZES:
        row = run_cell(local, data, batch_size, 1, seconds)
        rows.append({"reward": reward, "oracle": "in-process", **row, "server_batch_mean": None})
        print(rows[-1], flush=True)
    local.close()
    server = Server(reward, max_batch_size=64, max_wait_ms=5, log=Path(tempfile.gettempdir()) / f"winnow_bench_{reward}.log")
    try:
        for batch_size in BATCH_SIZES:
            for concurrency in CONCURRENCY:
                remote = RemoteOracle(server.url, request_batch_size=batch_size, max_in_flight=concurrency)
                remote.reward(*[x[:batch_size] for x in data])  # open the connection
                before = server.batch_histogram()
                row = run_cell(remote, data, batch_size, concurrency, seconds)
                batches, requests = (a - b for a, b in zip(server.batch_histogram(), before))
                remote.close()
                rows.append({"reward": reward, "oracle": "remote (Mosec)", **row,
                             "server_batch_mean": requests / batches if batches else None})
                print(rows[-1], flush=True)
    finally:
        server.stop()
    return rows


def machine() -> dict:
    def commit() -> str | None:
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "versions": {p: version(p) for p in ("mosec", "msgpack", "math-verify", "torch")},
            "winnow_commit": commit(), "load_average": os.getloadavg()}


def table(rows: list[dict]) -> str:
    lines = ["| reward | oracle | request batch | concurrency | items/s | p50 ms | p95 ms | server batch (requests) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mean = "" if r["server_batch_mean"] is None else f"{r['server_batch_mean']:.1f}"
        lines.append(f"| {r['reward']} | {r['oracle']} | {r['batch_size']} | {r['concurrency']} | "
                     f"{r['items_per_s']:,.0f} | {r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-per-cell", type=float, default=1.5)
    parser.add_argument("--rewards", nargs="+", default=["exact", "math"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    start = time.perf_counter()
    rows = [row for reward in args.rewards for row in bench_reward(reward, args.seconds_per_cell)]
    info["load_average_after"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - start
    settings = {"seconds_per_cell": args.seconds_per_cell, "server": {"num_workers": 1, "max_batch_size": 64,
                "max_wait_ms": 5}, "math_grader_workers": 2}
    (args.out / "oracle_throughput.json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": rows}, indent=2) + "\n")
    md = (f"# Oracle throughput: Mosec service vs in-process\n\n{info['date']}, {info['cpu_count']} cores, "
          f"load average {info['load_average'][0]:.1f} before / {info['load_average_after'][0]:.1f} after; "
          f"mosec {info['versions']['mosec']}; one oracle worker, dynamic batching up to 64 requests waiting "
          f"5 ms; in-process: one thread.\n\n{table(rows)}\n")
    (args.out / "oracle_throughput.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
