"""The oracle service and its client: the wire format and Bradley-Terry by hand, then a real Mosec server
on 127.0.0.1 (started and stopped here): scores equal the in-process oracle's, dynamic batching batches,
the token is enforced, malformed requests get a 4xx and leave the server serving, a training run scores
through it, and a server killed mid-call and restarted loses and duplicates nothing.

One server serves the module (its start-up, ~10 s on a loaded 2-core machine, is the cost to keep down);
the kill test runs last and leaves it restarted.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest

import winnow
from winnow.oracles import (FunctionOracle, OracleConfig, RemoteOracleConfig, RewardModelOracleConfig, RuleOracleConfig,
                            make_oracle)
from winnow.oracles import wire
from winnow.oracles.remote import OracleRequestError, OracleUnavailableError, RemoteOracle
from winnow.oracles.rules import exact_match_reward
from winnow.oracles.preference import bradley_terry
from winnow.oracles.serve import ServeConfig
from winnow.oracles.service import score_requests

TOKEN = "s3cret-token"
REPO = Path(winnow.__file__).resolve().parent.parent

# Served as ["exact", "rewards.py:tally"] with weights [1.0, 0.01]. `tally` scores a digit string as its
# number, so the scores of "i+0=" problems differ from index to index and a score placed at the wrong index
# shows. Each call appends the completions it scored to $TALLY_FILE: the server's own record of what it
# scored. A "delay" column slows scoring, so a test can kill the server in the middle of a call.
REWARDS = '''
import os, time

def tally(prompts, completions, reference, delay=None, **columns):
    if delay:
        time.sleep(sum(delay))
    with open(os.environ["TALLY_FILE"], "a") as f:
        f.write("".join(c + "\\n" for c in completions))
    return [float(c) if c.strip().isdigit() else 0.0 for c in completions]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`winnow serve-oracle` in its own process group, so stopping it leaves no worker behind."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port, self.health_port, self.num_starts = tmp, _free_port(), _free_port(), 0
        (tmp / "rewards.py").write_text(REWARDS)
        self.tally_file = tmp / "tally.txt"
        self.rewards = ["exact", f"{tmp / 'rewards.py'}:tally"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.num_starts += 1
        env = {**os.environ, "WINNOW_ORACLE_TOKEN": TOKEN, "TALLY_FILE": str(self.tally_file),
               "MOSEC_PATH": tempfile.mkdtemp(prefix="mosec-"), "PYTHONPATH": str(REPO)}
        self.log = open(self.tmp / f"server{self.num_starts}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.rule.rewards", *self.rewards,
             "--oracle.rule.reward-weights", "1.0", "0.01", "--port", str(self.port), "--health-port", str(self.health_port), "--max-batch-size", "16",
             "--max-wait-ms", "20", "--num-workers", "1", "--max-items-per-request", "256",
             "--max-request-bytes", "1000000", "--log-level", "warning"],
            env=env, cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        client = RemoteOracle(self.url, token=TOKEN, timeout_s=5)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert client.health()["status"] == "ok"
                client.close()
                return
            except OracleUnavailableError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start:\n" + self.log_tail())
                time.sleep(0.25)

    def kill(self, sig: int = signal.SIGKILL, wait_s: float = 15.0) -> None:
        """Signal the whole process group and wait until every process in it is gone."""
        pgid = self.process.pid
        os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid):
            self.process.poll()  # reap the leader, or it lingers as a zombie of the group
            if time.monotonic() > deadline:
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        self.process.wait()
        self.log.close()

    def log_tail(self) -> str:
        self.log.flush()
        return (self.tmp / f"server{self.num_starts}.log").read_text()[-3000:]

    def metrics(self) -> str:
        return urllib.request.urlopen(f"{self.url}/metrics", timeout=5).read().decode()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("oracle_service"))
    service.start()
    yield service
    service.kill(signal.SIGTERM)
    assert not _group_alive(service.process.pid), "the server left processes behind"


@pytest.fixture()
def local_oracle(service, tmp_path, monkeypatch):
    """The served oracle, in-process (its tally goes to a file of its own)."""
    monkeypatch.setenv("TALLY_FILE", str(tmp_path / "local_tally.txt"))
    oracle = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=service.rewards, reward_weights=[1.0, 0.01])))
    yield oracle
    oracle.close()


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _problems(n: int) -> tuple[list[str], list[str], list[str]]:
    """n prompts "i+0=", their references "i", and completions right for every third (and "i+1" else)."""
    prompts = [f"{i}+0=" for i in range(n)]
    references = [str(i) for i in range(n)]
    completions = [str(i) if i % 3 == 0 else str(i + 1) for i in range(n)]
    return prompts, completions, references


# ---------------------------------------------------------------------- without a server


def test_validate_accepts_a_good_request_and_names_each_problem():
    good = {"id": "r1", "prompts": ("a", "b"), "completions": ("x", "y"), "references": ("1", None),
            "columns": {"level": (1, 2)}}
    clean = wire.validate(good, "reward", max_items=4)
    assert clean == {"op": "reward", "id": "r1", "prompts": ["a", "b"], "completions": ["x", "y"],
                     "references": ["1", None], "columns": {"level": [1, 2]}}
    assert wire.validate({**good, "references": None}, "reward", 4)["references"] == [None, None]
    cases = [
        ([1, 2], "must be a msgpack map"),
        ({**good, "id": None}, "'id'"),
        ({**good, "completions": ["x", 3]}, "completions[1] must be a string, got int"),
        ({**good, "completions": ["x"]}, "every field needs one entry per item"),
        ({**good, "columns": {"level": [1]}}, "column 'level'"),
        ({**good, "prompts": [], "completions": [], "references": [], "columns": {}}, "no items"),
        ({**good, "prompts": ["a"] * 5, "completions": ["x"] * 5, "references": None, "columns": {}},
         "5 items in one request, over this service's limit of 4"),
    ]
    for request, message in cases:
        with pytest.raises(wire.RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
            wire.validate(request, "reward", max_items=4)
    with pytest.raises(wire.RequestError, match="completions_b"):
        wire.validate({"id": 1, "prompts": ["a"], "completions_a": ["x"]}, "compare", 4)


def test_check_token():
    wire.check_token({"token": None}, None)  # no token set: anything goes
    wire.check_token({"token": TOKEN}, TOKEN)
    for request in ({}, {"token": None}, {"token": "guess"}, "not a map"):
        with pytest.raises(wire.AuthError, match="unauthorized.*WINNOW_ORACLE_TOKEN"):
            wire.check_token(request, TOKEN)


def test_bradley_terry_by_hand():
    assert bradley_terry(1.0, 0.0) == pytest.approx(0.7310585786)   # sigmoid(1) = 1 / (1 + e^-1)
    assert bradley_terry(0.0, 1.0) == pytest.approx(0.2689414214)   # 1 - sigmoid(1)
    assert bradley_terry(2.0, 2.0) == 0.5
    assert bradley_terry(1.0, 0.0, temperature=2.0) == pytest.approx(0.6224593312)  # sigmoid(0.5)
    assert bradley_terry(1000.0, 0.0) == 1.0 and bradley_terry(-1000.0, 0.0) == 0.0  # no overflow
    assert bradley_terry(None, 1.0) is None and bradley_terry(1.0, None) is None


def test_score_requests_batches_and_isolates_a_failing_request():
    oracle = FunctionOracle([("exact", exact_match_reward, 1.0)])
    reward = {"op": "reward", "id": "a", "prompts": ["p", "p"], "completions": ["4", "5"],
              "references": ["4", "4"], "columns": {}}
    compare = {"op": "compare", "id": "b", "prompts": ["p"], "completions_a": ["5"], "completions_b": ["4"],
               "references": ["4"], "columns": {}}
    broken = {**reward, "id": "c", "references": [None, None]}  # exact needs references
    replies = score_requests(oracle, [reward, {"op": "health", "id": "h"}, compare, broken], info={"worker": 1})
    assert replies[0]["scores"] == [1.0, 0.0] and replies[0]["components"] == {"exact": [1.0, 0.0]}
    assert replies[1] == {"status": "ok", "worker": 1}
    assert replies[2]["probabilities"] == [pytest.approx(1 / (1 + math.e))]  # sigmoid(0 - 1)
    assert replies[3]["id"] == "c" and "MissingReferenceError" in replies[3]["error"]


def test_serve_and_service_do_not_import_each_other():
    """The launcher imports the workers; both share service_config; the workers never import the launcher."""
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((REPO / "winnow" / "oracles" / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | \
            {f"winnow.oracles.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "winnow.oracles" for a in node.names}

    assert "winnow.oracles.serve" not in imports("service") | imports("service_config")
    assert "winnow.oracles.service" in imports("serve") and "winnow.oracles.service_config" in imports("service")


def test_serve_config_refuses_serving_a_remote_oracle():
    with pytest.raises(ValueError, match="a service serves the rule kind.*leave --oracle.kind and --oracle.url"):
        ServeConfig(oracle=OracleConfig(kind="remote", remote=RemoteOracleConfig(url="http://127.0.0.1:1")))
    with pytest.raises(ValueError, match="serves the rule kind and does not use --oracle.reward-model.path"):
        ServeConfig(oracle=OracleConfig(reward_model=RewardModelOracleConfig(path="rm")))


def test_a_mosec_without_its_server_binary_is_named_before_serving(monkeypatch):
    """`pip install --target DIR mosec` puts the binary in DIR/bin, where Mosec never looks: say so at start."""
    import mosec.utils

    from winnow.oracles.serve import _check_mosec_binary

    _check_mosec_binary()  # this environment's Mosec has its binary
    monkeypatch.setattr(mosec.utils, "get_mosec_path", lambda: None)
    with pytest.raises(SystemExit, match="binary `mosec` is not in this Python's scripts directory"):
        _check_mosec_binary()


def test_oracle_url_flag_makes_a_remote_oracle(monkeypatch):
    from winnow.algorithms import GRPO
    from winnow.config import parse
    from winnow.recipes.rl import TrainConfig

    monkeypatch.setenv("MY_TOKEN", TOKEN)
    config = parse(TrainConfig[GRPO], TrainConfig(algo=GRPO()), [
        "--oracle.url", "http://127.0.0.1:9/", "--oracle.token-env", "MY_TOKEN", "--oracle.max-in-flight", "8",
        "--oracle.request-batch-size", "32", "--oracle.give-up-after-s", "30"], prog="winnow train grpo")
    oracle = make_oracle(config.oracle)
    assert isinstance(oracle, RemoteOracle) and oracle.url == "http://127.0.0.1:9"
    assert (oracle.token, oracle.max_in_flight, oracle.request_batch_size) == (TOKEN, 8, 32)
    assert oracle.outage.give_up_after_s == 30
    oracle.close()
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        OracleConfig(kind="remote", remote=RemoteOracleConfig(url="127.0.0.1:8000"))


def test_client_gives_up_after_the_deadline_with_an_error_that_says_why(caplog):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    oracle = RemoteOracle(url, give_up_after_s=0.5, backoff_max_s=0.1, log_every_s=0.2)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(OracleUnavailableError) as error:
        oracle.reward(["p"] * 10, ["c"] * 10, ["r"] * 10)
    assert 0.5 <= time.monotonic() - start < 5
    message = str(error.value)
    assert url in message and "give_up_after_s=0.5" in message and "ConnectionRefusedError" in message
    assert "actor paused; retrying" in caplog.text and "unreachable since" in caplog.text
    assert oracle.num_requests == 0 and oracle.num_retries > 0
    oracle.close()


# ---------------------------------------------------------------------- against a real server


def test_remote_scores_equal_the_in_process_oracle(service, local_oracle):
    remote = RemoteOracle(service.url, token=TOKEN, request_batch_size=7, max_in_flight=4)
    prompts, completions, references = _problems(300)
    columns = {"level": [i % 5 for i in range(300)]}
    result = remote.reward(prompts, completions, references, columns)
    expected = local_oracle.reward(prompts, completions, references, columns)
    assert result.scores == expected.scores and result.components == expected.components
    # by hand: "0" for "0+0=" is right, 1 + 0.01 * 0; "2" for "1+0=" is wrong, 0 + 0.01 * 2
    assert result.scores[:2] == [1.0, 0.02] and result.scores[299] == pytest.approx(0.01 * 300)
    assert result.metrics["oracle/num_requests"] == 43  # ceil(300 / 7)
    assert result.metrics["oracle/paused_s"] == 0 and result.metrics["oracle/num_failed"] == 0
    # compare: sigmoid(r_a - r_b) on the same rewards
    probabilities = remote.compare(prompts[:9], completions[:9], references[:9], references[:9])
    rewards_b = local_oracle.reward(prompts[:9], references[:9], references[:9]).scores
    assert probabilities == pytest.approx([bradley_terry(a, b) for a, b in zip(expected.scores, rewards_b)])
    remote.close()


def _batch_histogram(metrics: str) -> tuple[float, float, float]:
    """(batches, requests in them, batches of exactly 1 request) on the oracle stage, from /metrics."""
    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith(prefix) and 'stage="OracleWorker' in line)
    return (value("winnow_oracle_batch_size_count"), value("winnow_oracle_batch_size_sum"),
            value('winnow_oracle_batch_size_bucket{le="1.0"'))


def test_dynamic_batching_batches_concurrent_requests(service):
    before = _batch_histogram(service.metrics())
    remote = RemoteOracle(service.url, token=TOKEN, request_batch_size=1, max_in_flight=16)
    prompts, completions, references = _problems(160)
    assert remote.reward(prompts, completions, references).metrics["oracle/num_requests"] == 160
    remote.close()
    after = _batch_histogram(service.metrics())
    batches, requests, singles = (a - b for a, b in zip(after, before))
    assert requests == 160                # every request went through the oracle stage once
    assert batches < requests             # so some batches held several requests...
    assert singles < batches              # ...reported by Mosec's own batch-size histogram
    assert requests / batches > 1.5, f"mean batch {requests / batches:.2f} requests"


def test_token_is_enforced(service):
    body = {"id": "t", "prompts": ["1+1="], "completions": ["2"], "references": ["2"]}
    for token in (None, "wrong"):
        status, message = _post(f"{service.url}/reward", msgpack.packb({**body, "token": token}))
        assert status == 400 and b"unauthorized" in message, (status, message)
    status, reply = _post(f"{service.url}/reward", msgpack.packb({**body, "token": TOKEN}))
    assert status == 200 and msgpack.unpackb(reply)["scores"] == [pytest.approx(1.02)]
    start = time.monotonic()
    with pytest.raises(OracleRequestError, match="HTTP 400: bad request: unauthorized"):
        RemoteOracle(service.url, token="wrong").reward(["1+1="], ["2"], ["2"])
    assert time.monotonic() - start < 5  # refused, not retried until a deadline
    assert RemoteOracle(service.url).health()["rewards"] == service.rewards  # health needs no token


def test_get_health_answers_from_the_oracle_workers_beside_mosec(service):
    """Mosec's routes answer POST only; the responder on --health-port answers GET /health with the pipeline's
    own health reply as JSON (no token), 404 elsewhere, and 503 with the reason when the pipeline is down."""
    import json

    from winnow.oracles.serve import pipeline_health

    with urllib.request.urlopen(f"http://127.0.0.1:{service.health_port}/health", timeout=10) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "application/json"
        reply = json.loads(response.read())
    assert reply["status"] == "ok" and reply["rewards"] == service.rewards and reply["reward_weights"] == [1.0, 0.01]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{service.health_port}/reward", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as post_only:  # why the responder exists
        urllib.request.urlopen(f"{service.url}/health", timeout=10)
    assert post_only.value.code == 405
    status, body = pipeline_health(f"http://127.0.0.1:{_free_port()}/health", timeout_s=2)  # nothing listens
    assert status == 503 and body["status"] == "unavailable" and "did not answer" in body["error"]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(service, local_oracle):
    prompts, completions, references = _problems(200)
    result = {}
    # good requests in flight while the bad ones arrive: a bad request must not fail a batch it shares
    scorer = threading.Thread(target=lambda: result.update(scores=RemoteOracle(
        service.url, token=TOKEN, request_batch_size=2, max_in_flight=8).reward(prompts, completions, references)))
    scorer.start()
    good = {"id": "m", "token": TOKEN, "prompts": ["1+1="], "completions": ["2"], "references": ["2"]}
    bad = [
        (b"\xc1 not msgpack", 400, b"the body is not msgpack"),
        (msgpack.packb({**good, "completions": [2]}), 422, b"completions[0] must be a string, got int"),
        (msgpack.packb({**good, "references": ["2", "3"]}), 422, b"every field needs one entry per item"),
        (msgpack.packb({**good, "prompts": ["p"] * 257, "completions": ["c"] * 257, "references": None}), 422,
         b"257 items in one request, over this service's limit of 256"),
        (msgpack.packb({**good, "prompts": ["p" * 2_000_000]}), 413, b""),
    ]
    for _ in range(3):
        for body, status, message in bad:
            got_status, got = _post(f"{service.url}/reward", body)
            assert got_status == status and message in got, (got_status, got[:200])
    scorer.join(timeout=60)
    assert result["scores"].scores == local_oracle.reward(prompts, completions, references).scores
    # a request the oracle itself cannot score (exact needs references) is refused with the reason
    with pytest.raises(OracleRequestError, match="MissingReferenceError: reward 'exact'"):
        RemoteOracle(service.url, token=TOKEN).reward(["1+1="], ["2"], [None])
    status, reply = _post(f"{service.url}/reward", msgpack.packb(good))
    assert status == 200 and msgpack.unpackb(reply)["scores"] == [pytest.approx(1.02)]


@pytest.mark.slow
def test_training_run_scores_through_the_service(service, tiny_tokenizer, tmp_path, monkeypatch):
    from winnow.algorithms import GRPO
    from winnow.loops.config import EvalConfig, RolloutConfig
    from winnow.recipes.rl import TrainConfig
    from winnow.setup import ModelConfig
    from winnow.data import DataConfig
    from winnow.data.tiny import build_tiny_model, save_tiny
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.recipes.rl import train

    save_tiny(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "model")
    monkeypatch.setenv("WINNOW_ORACLE_TOKEN", TOKEN)
    config = TrainConfig(
        algo=GRPO(), model=ModelConfig(path=str(tmp_path / "model")),
        data=DataConfig(num_train_prompts=64, max_eval_prompts=8),
        oracle=OracleConfig(kind="remote", remote=RemoteOracleConfig(url=service.url, request_batch_size=8)),
        rollout=RolloutConfig(prompts_per_iteration=8, num_samples=4, max_tokens=4),
        eval=EvalConfig(every=0, k=0, max_prompts=8), logging=LoggingConfig(progress=False),
        num_iterations=3, device="cpu", num_threads=1, output_dir=str(tmp_path), run_name="run",
        save_final=False,
    )
    rows = [r for r in read_metrics(train(config)) if "counts/oracle_queries" in r]
    last = rows[-1]
    assert last["counts/oracle_queries"] == 3 * 8 * 4 and last["counts/unscored_samples"] == 0
    assert last["oracle/num_requests"] == 4 and last["oracle/paused_s"] == 0  # 32 samples in requests of 8


def test_server_killed_mid_call_and_restarted_loses_and_duplicates_nothing(service, local_oracle, caplog):
    """Runs last: it kills the module's server (SIGKILL, the whole group, as a crash would) while a call
    is half done, and starts it again on the same port."""
    n, chunk, in_flight = 2000, 10, 4
    prompts, completions, references = _problems(n)
    columns = {"delay": [0.001] * n}  # 10 ms per request, so the call is still running when the kill comes
    service.tally_file.write_text("")
    remote = RemoteOracle(service.url, token=TOKEN, request_batch_size=chunk, max_in_flight=in_flight,
                          give_up_after_s=180, backoff_max_s=0.5, log_every_s=2)
    result = {}
    caller = threading.Thread(target=lambda: result.update(r=remote.reward(prompts, completions, references,
                                                                              columns)))
    with caplog.at_level(logging.WARNING, logger="winnow.oracles.remote"):
        caller.start()
        while len(service.tally_file.read_text().splitlines()) < 300:  # some chunks are served
            time.sleep(0.01)
        service.kill(signal.SIGKILL)
        scored_before_kill = len(service.tally_file.read_text().splitlines())
        assert scored_before_kill < n, "the call finished before the kill; slow it down"
        time.sleep(1.5)
        service.start()
        caller.join(timeout=120)
    assert not caller.is_alive()
    scores = result["r"].scores
    expected = local_oracle.reward(prompts, completions, references, columns).scores
    assert scores == expected and None not in scores   # every index has its own score, exactly once
    assert remote.num_requests == n // chunk             # one accepted reply per request, no more
    served = service.tally_file.read_text().splitlines()
    assert set(served) == set(completions)              # the server scored every completion...
    # ...and a few twice: only those whose reply the kill lost (at most the requests in flight then)
    assert len(served) - n <= in_flight * chunk
    assert result["r"].metrics["oracle/paused_s"] > 1.5 and result["r"].metrics["oracle/num_retries"] > 0
    assert "actor paused; retrying" in caplog.text and "is back after" in caplog.text
    remote.close()


def test_serve_refuses_a_mosec_path_too_long_for_its_sockets(monkeypatch):
    # Mosec names its sockets MOSEC_PATH/ipc_STAGE_N.socket; past 107 characters it panics and never answers
    from winnow.oracles.serve import SOCKET_PATH_MAX, _check_ipc_path, _stages

    stages = _stages("pairwise")  # the longest stage names
    monkeypatch.setenv("MOSEC_PATH", "/tmp/m")
    _check_ipc_path(stages)
    folder = "/tmp/" + "d" * (SOCKET_PATH_MAX - len("/tmp/") - len("/ipc_PairwiseCompareIngress_99.socket") + 1)
    monkeypatch.setenv("MOSEC_PATH", folder)
    with pytest.raises(SystemExit, match=r"MOSEC_PATH=/tmp/d+ is too long .*108 characters.*shorter folder"):
        _check_ipc_path(stages)
