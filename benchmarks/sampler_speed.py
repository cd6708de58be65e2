"""Times one sampling call of the engine's sampler on a [rows, vocab] logits tensor, against the exponential
race it replaced (kept below as the reference), on CPU or one GPU.

    python benchmarks/sampler_speed.py [--device cpu|cuda] [--rows 512] [--vocab 151936] [--out FILE.json]

Both draw exactly from softmax(logits / T); the race needs [rows, vocab] random numbers, the sampler one
per row (`winnow/engines/sampling.py`). Reports the best of --repeats calls, in milliseconds. On a GPU it
also counts how often the float32 cumsum of a softmax row goes down (rounding in the parallel scan), the
one way inverse-CDF sampling could pick a token outside the kept set.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from winnow.engines.sampling import Sampler, row_keys, top_k_top_p


def race_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator):
    """The static decoder's sampler before the shared one: argmax(logits/T - log E), E ~ Exp(1) over [B, V]."""
    scaled = logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    drawable = top_k_top_p(scaled, top_k, top_p) if top_k > 0 or top_p < 1.0 else scaled
    race = torch.empty_like(scaled).exponential_(generator=generator).clamp_(min=1e-30).log_()
    tokens = (drawable - race).argmax(dim=-1)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


def best_ms(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=50, help="also time with this top-k (0: skip)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, device=device) * 3).float()  # [B, V] float32
    keys = row_keys(list(range(args.rows)), n=1, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "rows": args.rows, "vocab": args.vocab, "ms": {}}
    cases = [("t1", 1.0, -1, 1.0)] + ([(f"t1_top{args.top_k}", 1.0, args.top_k, 1.0)] if args.top_k else [])
    for name, temperature, top_k, top_p in cases:
        sampler = Sampler(temperature, top_k, top_p)
        sampler(logits, keys, step)  # warm-up
        race_reference(logits, temperature, top_k, top_p, generator)
        result["ms"][f"race_{name}"] = best_ms(lambda: race_reference(logits, temperature, top_k, top_p, generator),
                                               device, args.repeats)
        result["ms"][f"sampler_{name}"] = best_ms(lambda: sampler(logits, keys, step), device, args.repeats)
    if device.type == "cuda":
        for temperature in (1.0, 0.3):
            cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1)
            result[f"cumsum_rows_going_down_t{temperature}"] = int((cdf.diff(dim=-1) < 0).any(dim=-1).sum())
    result["load_average_1min"] = os.getloadavg()[0]  # other processes on the machine (CPU timings move with it)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
