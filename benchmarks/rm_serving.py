"""Reward-model serving: throughput and p50/p99 latency of a Mosec-served reward model against request size
and concurrency, against the same model in-process, and the forward's tokens/s against the matmul ceiling.

    python benchmarks/rm_serving.py --mode gpu   # one GPU: a Qwen2-1.5B-shaped reward model, random weights, bf16
    python benchmarks/rm_serving.py --mode cpu   # a tiny model on CPU: checks the script end to end (~1-2 minutes)

For each cell (items per request x concurrent clients), `concurrency` threads each send requests of `items`
(prompt, response) pairs for about `--seconds-per-cell`; the in-process rows call `RewardModelOracle.reward`
the same way (one model, calls serialised by a lock: a process holds one copy of the model). Reported: pairs
scored per second and request latency p50/p99. The forward
probe runs the model on packs of `--token-budget` tokens and compares tokens/s with the ceiling set by the
measured bf16 (fp32 on CPU) matmul rate: tokens/s <= matmul FLOP/s / (2 x parameters outside the embedding table).

Writes `rm_serving_<mode>.json` (machine, versions, every cell) and `rm_serving_<mode>.md` (the tables) to --out.

On a machine with torch and transformers but no Mosec (the GPU machine has no network): bring the wheels for its
Python (3.12) and install them beside the repository first, in one command:

    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d .whl mosec==0.9.8 msgspec defspec msgpack    # here, once: 5 wheels with offapi (.whl/ is ignored)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        cp /tmp/site/bin/mosec "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/" && \
        PYTHONPATH=/tmp/site:$PWD python3 benchmarks/rm_serving.py --mode gpu --out $OUT    # there

(Mosec looks for its server binary in the Python's scripts directory only: a `--target` install needs the copy.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from winnow.data.tiny import save_tokenizer, tiny_qwen2_config, train_char_tokenizer  # noqa: E402
from winnow.oracles.remote import OracleUnavailableError, RemoteOracle  # noqa: E402
from winnow.oracles.reward_model import RewardModelOracle, score_ids  # noqa: E402

SHAPES = {
    # Qwen2-1.5B's shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960; vocabulary 151,936)
    "1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                 vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=512,
                 vocab_size=None, max_position_embeddings=1024),
}


def build_model(shape: str, out: Path) -> tuple[Path, int]:
    """A random-weight Qwen2 reward model (num_labels=1) of `shape` and a character tokenizer; (dir, parameters)."""
    from transformers import Qwen2ForSequenceClassification

    tokenizer = train_char_tokenizer(["0123456789+-*= abcdefghijklmnopqrstuvwxyz.,"])
    s = dict(SHAPES[shape])
    vocab = s.pop("vocab_size") or len(tokenizer)
    config = tiny_qwen2_config(vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **s)
    config.num_labels = 1
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out, sum(p.numel() for p in model.parameters())


def texts(items: int, response_chars: int, seed: int) -> tuple[list[str], list[str]]:
    prompts = [f"{(seed + i) % 97}+{i % 89}= " for i in range(items)]
    completions = [(("the answer is " + str(seed + i) + " ") * response_chars)[: response_chars - (i % 7) * 3]
                   for i in range(items)]
    return prompts, completions


def run_cell(call, items: int, concurrency: int, seconds: float, response_chars: int) -> dict:
    """`concurrency` threads calling `call(prompts, completions)` for ~`seconds`; pairs/s and latency quantiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            prompts, completions = texts(items, response_chars, seed=1000 * k + n)
            start = time.perf_counter()
            call(prompts, completions)
            with lock:
                latencies.append(time.perf_counter() - start)
            n += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"items": items, "concurrency": concurrency, "requests": len(latencies),
            "pairs_per_s": len(latencies) * items / elapsed, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = (20 if device.type == "cuda" else 5), time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_probe(oracle: RewardModelOracle, num_params: int, token_budget: int, row_tokens: int) -> dict:
    """Tokens/s of the model's forward on full packs (token_budget // row_tokens rows of row_tokens tokens)."""
    device = oracle.device
    rows = [[5] * row_tokens for _ in range(max(1, token_budget // row_tokens))]
    for _ in range(2):
        score_ids(oracle.model, rows, oracle.tokenizer.pad_token_id, device)
    sync(device)
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        score_ids(oracle.model, rows, oracle.tokenizer.pad_token_id, device)
    sync(device)
    tokens_per_s = reps * len(rows) * row_tokens / (time.perf_counter() - start)
    flops = matmul_flops(device, next(oracle.model.parameters()).dtype)
    # 2 FLOPs per parameter per token, the embedding table aside (a lookup; the score head is a [hidden, 1] matmul)
    flop_params = num_params - oracle.model.get_input_embeddings().weight.numel()
    ceiling = flops / (2 * flop_params)
    return {"rows": len(rows), "row_tokens": row_tokens, "tokens_per_s": tokens_per_s,
            "matmul_tflops": flops / 1e12, "ceiling_tokens_per_s": ceiling, "fraction_of_ceiling": tokens_per_s / ceiling}


def start_server(model_dir: Path, port: int, args, tmp: Path, num_workers: int | None = None,
                 gpus_per_worker: int = 1) -> subprocess.Popen:
    # the repository first, then whatever the caller put on the path (e.g. wheels installed with --target)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "MOSEC_PATH": tempfile.mkdtemp(prefix="mosec-"), "WINNOW_ORACLE_TOKEN": ""}
    log = open(tmp / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "winnow.cli", "serve-oracle", "--oracle.kind", "reward_model",
         "--oracle.reward-model.path", str(model_dir), "--oracle.reward-model.max-length", str(args.max_length),
         "--port", str(port), "--max-batch-size", "64", "--max-wait-ms", str(args.max_wait_ms),
         "--token-budget", str(args.token_budget), "--log-level", "warning",
         "--gpus-per-worker", str(gpus_per_worker),
         *(["--num-workers", str(num_workers)] if num_workers else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client, deadline = RemoteOracle(f"http://127.0.0.1:{port}", timeout_s=5), time.monotonic() + 600
    while True:
        try:
            client.health()
            return process
        except OracleUnavailableError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--seconds-per-cell", type=float, default=None)
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-wait-ms", type=int, default=5)
    parser.add_argument("--layouts", default=None,
                        help="served layouts, WORKERSxGPUS_PER_WORKER comma-separated (e.g. 1x1,2x1,1x2: one GPU, "
                             "data parallel over two, one model's layers over two); default: 1x1, and on 2+ GPUs "
                             "also 2x1 and 1x2")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args()


def served_cells(model_dir: Path, layout: str, args, tmp: Path, grid, seconds: float, response_chars: int) -> list:
    """Every grid cell against a Mosec server of `layout` (WORKERSxGPUS_PER_WORKER) on 127.0.0.1."""
    workers, gpus_per_worker = (int(x) for x in layout.split("x"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    server = start_server(model_dir, port, args, tmp, workers, gpus_per_worker)
    start_s = time.perf_counter() - started
    try:
        remote = RemoteOracle(f"http://127.0.0.1:{port}", request_batch_size=1024, max_in_flight=64, timeout_s=120)
        rows = [{"where": f"served {layout}", "server_start_s": start_s, **run_cell(
            lambda p, c: remote.reward(p, c, [None] * len(p)), items, concurrency, seconds, response_chars)}
            for items, concurrency in grid]
        remote.close()
        return rows
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def write_report(result: dict, out: Path) -> None:
    """rm_serving_MODE.json and a markdown table of the cells beside it."""
    probe, rows, mode = result["forward"], result["cells"], result["mode"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rm_serving_{mode}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Reward-model serving ({mode}, {result['parameters'] / 1e6:.1f}M parameters, token budget "
             f"{result['token_budget']})", "",
             f"Forward: {probe['tokens_per_s']:,.0f} tokens/s on packs of {probe['rows']} x {probe['row_tokens']} "
             f"tokens; matmul {probe['matmul_tflops']:.2f} TFLOP/s gives a ceiling of "
             f"{probe['ceiling_tokens_per_s']:,.0f} tokens/s ({100 * probe['fraction_of_ceiling']:.0f}% of it).", "",
             "`served WxG`: W Mosec workers of G GPUs each (2x1: data parallel over two GPUs; 1x2: one model's "
             "layers placed over two GPUs, pipeline parallel).", "",
             f"Each pair (prompt, response) is about {result['mean_row_tokens']:.0f} tokens.", "",
             "| where | items/request | concurrency | requests | pairs/s | p50 ms | p99 ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['where']} | {r['items']} | {r['concurrency']} | {r['requests']} | {r['pairs_per_s']:,.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in rows]
    (out / f"rm_serving_{mode}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA GPU; --mode cpu runs the tiny model")
    seconds = args.seconds_per_cell or (10.0 if gpu else 2.0)
    args.token_budget = args.token_budget or (65536 if gpu else 2048)
    grid = [(1, 1), (1, 32), (16, 1), (16, 16), (64, 4), (256, 4)] if gpu else [(1, 1), (1, 8), (8, 4), (32, 2)]
    response_chars = 512 if gpu else 48
    num_gpus = torch.cuda.device_count() if gpu else 0
    layouts = args.layouts or ("1x1,2x1,1x2" if num_gpus >= 2 else "1x1")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir, num_params = build_model("1.5b" if gpu else "tiny", tmp / "rm")
        oracle = RewardModelOracle.from_pretrained(str(model_dir), batch_size=64, max_length=args.max_length,
                                                   device="cuda" if gpu else "cpu")
        if gpu:
            oracle.model.to(torch.bfloat16)
        probe = forward_probe(oracle, num_params, args.token_budget, 512 if gpu else 32)
        sample_prompts, sample_completions = texts(256, response_chars, seed=0)
        mean_row_tokens = statistics.mean(len(oracle.tokenizer(p + c)["input_ids"])
                                          for p, c in zip(sample_prompts, sample_completions))
        lock = threading.Lock()

        def in_process(prompts, completions):
            with lock:
                oracle.reward(prompts, completions, [None] * len(prompts))

        rows = [{"where": "in-process", **run_cell(in_process, i, c, seconds, response_chars)} for i, c in grid]
        del oracle
        for layout in layouts.split(","):
            rows += served_cells(model_dir, layout, args, tmp, grid, seconds, response_chars)
    write_report({"mode": args.mode, "date": datetime.now(timezone.utc).isoformat(), "machine": platform.node(),
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                  "gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__,
                  "transformers": version("transformers"), "mosec": version("mosec"), "parameters": num_params,
                  "token_budget": args.token_budget, "seconds_per_cell": seconds, "response_chars": response_chars,
                  "mean_row_tokens": mean_row_tokens, "num_gpus": num_gpus, "layouts": layouts, "forward": probe,
                  "cells": rows}, Path(args.out))


if __name__ == "__main__":
    main()
