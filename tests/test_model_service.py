"""A reward model served by Mosec (`winnow serve-oracle --oracle.kind reward_model`): token-budget packing by
hand, then a real server on 127.0.0.1 with two CPU workers: served scores equal in-process scores, concurrent
requests are batched and no forward pads past the budget, malformed requests get a 4xx, and a server killed
mid-call and restarted loses nothing. A pairwise preference model served the same way compares as it does
in-process and refuses /reward."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

import winnow

pytest.importorskip("mosec")
from winnow.oracles.model_service import pack_by_token_budget
from test_pairwise_oracle import pairwise_dir  # noqa: E402,F401 (a fixture)

REPO = Path(winnow.__file__).resolve().parent.parent
BUDGET = 64


def test_pack_by_token_budget_by_hand():
    # lengths 3, 9, 5, 20, 4 with buckets of 4 and a budget of 24 tokens:
    # longest first: 20 -> width 20 alone (2 x 20 > 24); 9 -> width 12, holds 9 and 5 (2 x 12 = 24), then 4
    # (3 x 12 > 24) starts a pack of width 4 with 4 and 3 (2 x 4 = 8)
    assert pack_by_token_budget([3, 9, 5, 20, 4], 24, 4) == [([3], 20), ([1, 2], 12), ([4, 0], 4)]
    # a row over the budget runs alone at its own length, never rounded up; the short rows are not padded to it
    assert pack_by_token_budget([30, 2, 2], 24, 8) == [([0], 30), ([1, 2], 8)]
    for lengths in ([1] * 100, list(range(1, 60)), [7, 63, 64, 65, 1]):
        packs = pack_by_token_budget(lengths, BUDGET, 8)
        assert sorted(i for rows, _ in packs for i in rows) == list(range(len(lengths)))
        assert all(len(rows) * width <= BUDGET or len(rows) == 1 for rows, width in packs)
        assert all(width >= max(lengths[i] for i in rows) for rows, width in packs)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random-weight Qwen2 reward model (num_labels=1) and its character tokenizer."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    from winnow.data.tiny import save_tokenizer, tiny_qwen2_config, train_char_tokenizer

    tokenizer = train_char_tokenizer(["0123456789+-*= abcdefghijklmnopqrstuvwxyz"])
    config = tiny_qwen2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served_rm") / "rm"
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


class ModelService:
    def __init__(self, tmp: Path, model: Path, kind: str = "reward_model", num_workers: int = 2) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp, self.model, self.num_starts = tmp, model, 0
        self.kind, self.num_workers = kind, num_workers
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from winnow.oracles.remote import OracleUnavailableError, RemoteOracle

        self.num_starts += 1
        env = {**os.environ, "MOSEC_PATH": tempfile.mkdtemp(prefix="mosec-"), "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1", "WINNOW_ORACLE_TOKEN": ""}
        self.log = open(self.tmp / f"server{self.num_starts}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.kind", self.kind,
             f"--oracle.{self.kind.replace('_', '-')}.path", str(self.model),
             f"--oracle.{self.kind.replace('_', '-')}.max-length", "96",
             "--port", str(self.port), "--num-workers", str(self.num_workers), "--max-batch-size", "16",
             "--max-wait-ms", "50",
             "--token-budget", str(BUDGET), "--pad-bucket", "8", "--log-level", "warning"],
            env=env, cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        client = RemoteOracle(self.url, timeout_s=5)
        while True:
            try:
                assert client.health()["status"] == "ok"
                return client.close()
            except OracleUnavailableError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start:\n" + (self.tmp / f"server{self.num_starts}.log")
                                       .read_text()[-3000:])
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
                time.sleep(0.1)
            except ProcessLookupError:
                break
        self.log.close()


@pytest.fixture(scope="module")
def service(reward_model_dir, tmp_path_factory):
    service = ModelService(tmp_path_factory.mktemp("model_service"), reward_model_dir)
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def local(reward_model_dir):
    from winnow.oracles.reward_model import RewardModelOracle

    return RewardModelOracle.from_pretrained(str(reward_model_dir), max_length=96)


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _items(n: int) -> tuple[list[str], list[str]]:
    """Prompts and completions of many lengths (1 to ~40 tokens a pair)."""
    prompts = [f"{i}+{i % 7}=" for i in range(n)]
    completions = [str(i) * (1 + i % 12) for i in range(n)]
    return prompts, completions


def test_served_scores_equal_in_process_scores(service, local):
    from winnow.oracles.preference import bradley_terry
    from winnow.oracles.remote import RemoteOracle

    prompts, completions = _items(40)
    prompts.append("1+1=")
    completions.append("a" * 150)  # over the budget (and truncated to max_length 96): a forward of its own
    remote = RemoteOracle(service.url, request_batch_size=8, max_in_flight=4)
    served = remote.reward(prompts, completions, [None] * len(prompts))
    expected = local.scores(prompts, completions)
    assert served.scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in expected)) > 30  # the scores differ from row to row: a mix-up would show
    probabilities = remote.compare(prompts[:10], completions[:10], completions[10:20])
    b_scores = local.scores(prompts[:10], completions[10:20])  # the b's answer the same prompts as the a's
    assert probabilities == pytest.approx([bradley_terry(a, b) for a, b in zip(expected[:10], b_scores)], abs=1e-4)
    remote.close()


def test_concurrent_requests_are_batched_within_the_token_budget_over_two_workers(service, local):
    prompts, completions = _items(96)

    def one(i: int) -> dict:
        body = {"id": i, "prompts": prompts[i:i + 1], "completions": completions[i:i + 1], "references": None}
        status, reply = _post(f"{service.url}/reward", msgpack.packb(body))
        assert status == 200, reply
        return msgpack.unpackb(reply)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(one, range(96)))
    metrics = [r["metrics"] for r in replies]
    assert [r["scores"][0] for r in replies] == pytest.approx(local.scores(prompts, completions), abs=1e-4)
    assert max(m["reward_model/requests_per_batch"] for m in metrics) > 1  # Mosec batched requests...
    assert max(m["reward_model/rows_per_forward_max"] for m in metrics) > 1  # ...and a forward held several rows
    assert max(m["reward_model/padded_tokens_max"] for m in metrics) <= BUDGET  # never padded past the budget
    assert {r["worker"] for r in replies} == {1, 2}  # both workers scored


def test_malformed_requests_get_4xx(service):
    good = {"id": "m", "prompts": ["1+1="], "completions": ["2"], "references": None}
    for body, status, message in [
        (b"\xc1 not msgpack", 400, b"the body is not msgpack"),
        (msgpack.packb({**good, "completions": [2]}), 422, b"completions[0] must be a string, got int"),
        (msgpack.packb({**good, "prompts": ["1+1=", "2+2="]}), 422, b"every field needs one entry per item"),
    ]:
        got_status, got = _post(f"{service.url}/reward", body)
        assert got_status == status and message in got, (got_status, got[:200])
    status, reply = _post(f"{service.url}/reward", msgpack.packb(good))
    assert status == 200 and len(msgpack.unpackb(reply)["scores"]) == 1


def test_ppo_trains_on_the_served_reward_model(service, tiny_tokenizer, tmp_path):
    """Classic RLHF's last step, short: PPO's rewards are the served model's scores (tiny policy, 2 iterations)."""
    from winnow.algorithms import PPO
    from winnow.data import DataConfig
    from winnow.data.tiny import build_tiny_model, save_tiny
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.config import EvalConfig, RolloutConfig
    from winnow.oracles import OracleConfig, RemoteOracleConfig
    from winnow.recipes.rl import TrainConfig, train
    from winnow.setup import ModelConfig

    save_tiny(build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "policy")
    config = TrainConfig(
        algo=PPO(), model=ModelConfig(path=str(tmp_path / "policy")),
        data=DataConfig(num_train_prompts=32, max_eval_prompts=8),
        oracle=OracleConfig(kind="remote", remote=RemoteOracleConfig(url=service.url, request_batch_size=8)),
        rollout=RolloutConfig(prompts_per_iteration=8, num_samples=2, max_tokens=4),
        eval=EvalConfig(every=0, k=0, max_prompts=8), logging=LoggingConfig(progress=False),
        num_iterations=2, device="cpu", num_threads=1, output_dir=str(tmp_path), run_name="ppo", save_final=False)
    rows = [r for r in read_metrics(train(config)) if "oracle/num_requests" in r]
    assert len(rows) == 2 and rows[-1]["counts/oracle_queries"] == 2 * 8 * 2 and rows[-1]["counts/unscored_samples"] == 0
    assert rows[-1]["counts/optimizer_steps"] >= 2
    assert all(r["oracle/server/reward_model/forwards"] >= 1 for r in rows)  # scored by the model's workers


@pytest.mark.slow  # a second server start: ~75 s on a loaded 2-core machine
def test_server_killed_mid_call_and_restarted_loses_nothing(service, local):
    """The last test of the module: the client waits through the outage and every score arrives once."""
    import threading

    from winnow.oracles.remote import RemoteOracle

    prompts, completions = _items(400)
    result: dict = {}
    remote = RemoteOracle(service.url, request_batch_size=4, max_in_flight=2, timeout_s=10, give_up_after_s=300)
    caller = threading.Thread(target=lambda: result.update(r=remote.reward(prompts, completions, [None] * 400)))
    caller.start()
    time.sleep(1.0)
    service.stop(signal.SIGKILL)
    assert caller.is_alive()  # the call is waiting on the dead server, not finished
    service.start()
    caller.join(timeout=300)
    assert result["r"].scores == pytest.approx(local.scores(prompts, completions), abs=1e-4)
    assert result["r"].num_failed == 0
    remote.close()


def test_served_pairwise_model_compares_as_in_process_and_refuses_rewards(pairwise_dir, tmp_path):
    from winnow.oracles import OracleConfig, RemoteOracleConfig, make_oracle
    from winnow.oracles.pairwise import PairwiseOracle

    service = ModelService(tmp_path, pairwise_dir, kind="pairwise", num_workers=1)
    service.start()
    try:
        prompts, completions = _items(24)
        a, b = completions[:12], completions[12:]
        oracle = make_oracle(OracleConfig(kind="remote", remote=RemoteOracleConfig(
            url=service.url, pairwise=True, request_batch_size=5)), needs="compare")
        served = oracle.compare(prompts[:12], a, b).probabilities
        oracle.close()
        local = PairwiseOracle.from_pretrained(str(pairwise_dir), max_length=96).compare(prompts[:12], a, b)
        assert served == pytest.approx(local.probabilities, abs=1e-4)
        assert len({round(p, 4) for p in served}) > 8  # the pairs differ: a mix-up would show
        body = {"id": "r", "prompts": ["1+1="], "completions": ["2"], "references": None}
        status, reply = _post(f"{service.url}/reward", msgpack.packb(body))
        assert status == 422 and b"serves a pairwise preference model" in reply, (status, reply[:200])
    finally:
        service.stop()


def test_serve_config_takes_the_reward_model_kind_and_refuses_the_others():
    from winnow.oracles import JudgeOracleConfig, OracleConfig, PairwiseOracleConfig, RewardModelOracleConfig
    from winnow.oracles.serve import ServeConfig

    ServeConfig(oracle=OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path="rm")))
    ServeConfig(oracle=OracleConfig(kind="pairwise", pairwise=PairwiseOracleConfig(path="pm")))
    with pytest.raises(ValueError, match="serve a model with --oracle.kind reward_model or pairwise"):
        ServeConfig(oracle=OracleConfig(kind="judge"))
    with pytest.raises(ValueError, match="serves the reward_model kind and does not use --oracle.judge.model"):
        ServeConfig(oracle=OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path="rm"),
                                        judge=JudgeOracleConfig(model="x")))
    with pytest.raises(ValueError, match="token_budget=0 must be >= 1"):
        ServeConfig(oracle=OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path="rm")),
                    token_budget=0)


def test_layer_device_map_splits_the_layers_and_the_split_model_scores_the_same(reward_model_dir, local):
    """Pipeline placement, checked on CPU: every module placed, layers in contiguous equal runs, embeddings first
    and the head last; a model loaded with the map (devices all "cpu" here) scores as the unsplit model does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from winnow.oracles.model_service import layer_device_map, load_split_model

    from winnow.data.tiny import tiny_qwen2_config

    config = tiny_qwen2_config(64, num_layers=7)
    config.num_labels = 1
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    device_map = layer_device_map(skeleton, [0, 1, 2])
    assert [device_map[f"model.layers.{i}"] for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert device_map["model.embed_tokens"] == 0 and device_map["model.norm"] == 2 and device_map["score"] == 2
    placed = set(device_map)
    assert all(any(n == p or n.startswith(p + ".") for p in placed) for n, _ in skeleton.named_parameters())

    model = load_split_model(str(reward_model_dir), ["cpu", "cpu"], torch.float32)
    assert {m.weight.device.type for m in model.modules() if isinstance(m, torch.nn.Linear)} == {"cpu"}
    from winnow.oracles.reward_model import encode_pairs, score_ids

    prompts, completions = _items(8)
    rows = encode_pairs(local.tokenizer, prompts, completions, 96)
    assert score_ids(model, rows, local.tokenizer.pad_token_id, "cpu") == pytest.approx(
        local.scores(prompts, completions), abs=1e-5)
