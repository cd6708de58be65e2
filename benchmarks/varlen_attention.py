"""Attention of a shared-prompt packed row (`--learner.share-prompts`), forward + backward, by kernel (GPU only).

    PYTHONPATH=$PWD python benchmarks/varlen_attention.py --out benchmarks/results/varlen_attention.json

The layout is the learner's on the GRPO benchmark's rollout: groups of one 128-token prompt and 8 responses, a
micro-batch of 9 groups (38,016 query tokens, the 40,960-token budget's size); `--lengths varied` draws the
responses' lengths long-tailed (16-512). Qwen2.5-0.5B's attention shape: 14 query heads, 2 K/V heads, head size
64, bf16. Variants, each timed over `--repeats` forward + backward calls (CUDA events, after two warm-ups):

    flash_repeat   what the learner runs on a torch without grouped-query varlen: FlashAttention 2's varlen kernel,
                   K/V gathered per segment and repeated for the query heads
    flash_gqa      the same kernel given the 2 K/V heads (its own grouped-query support), through aten directly:
                   the learner's `shared_prompts._grouped_query_function`
    cudnn_ragged   cuDNN's attention with ragged offsets (what SDPA's cuDNN backend runs for separate rows), K/V
                   repeated; checked against flash_repeat, since its causal mask may align at the top
    sdpa_rows      for scale: the same responses as separate [rows, 640] rows, SDPA (cuDNN) with its prompt, unshared

Each variant's output is checked against flash_repeat; one that fails or differs records why instead of a time.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from winnow.learner import shared_prompts

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def layout(num_groups: int, samples: int, prompt_len: int, lengths: list[int]):
    """cu_seq_q/cu_seq_k and the key index of the packed row (prompt segments, then each response's)."""
    q_lens, k_lens, key_index, start = [], [], [], 0
    for g in range(num_groups):
        prompt_start = start
        q_lens.append(prompt_len), k_lens.append(prompt_len)
        key_index += range(start, start + prompt_len)
        start += prompt_len
        for r in lengths[g * samples:(g + 1) * samples]:
            q_lens.append(r), k_lens.append(prompt_len + r)
            key_index += list(range(prompt_start, prompt_start + prompt_len)) + list(range(start, start + r))
            start += r
    cu = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()  # noqa: E731
    pow2 = shared_prompts._power_of_two  # the learner's rounding of max_q / max_k
    return cu(q_lens), cu(k_lens), torch.tensor(key_index).cuda(), pow2(max(q_lens)), pow2(max(k_lens)), start


class CudnnRagged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k):
        res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, True, False)
        out, lse, seed, offset = res[0], res[1], res[6], res[7]
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu_q, cu_k)
        ctx.max = (max_q, max_k)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, torch.empty(0, device=q.device), cu_q, cu_k,
            *ctx.max, 0.0, True)
        return dq, dk, dv, None, None, None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", choices=["fixed", "varied"], default="fixed")
    parser.add_argument("--groups", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    rng = random.Random(0)
    samples, prompt_len = 8, 128
    n = args.groups * samples
    lengths = [512] * n if args.lengths == "fixed" else [min(512, int(16 + rng.expovariate(1 / 140))) for _ in range(n)]
    cu_q, cu_k, key_index, max_q, max_k, total = layout(args.groups, samples, prompt_len, lengths)
    torch.manual_seed(0)
    q0 = torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k0 = torch.randn(total, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v0 = torch.randn(total, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    reps = HEADS // KV_HEADS

    def flash_repeat(q, k, v):
        k, v = k[key_index].repeat_interleave(reps, dim=1), v[key_index].repeat_interleave(reps, dim=1)
        try:
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))
        except TypeError:
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True)

    grouped_query = shared_prompts._grouped_query_function()  # what the learner runs

    def flash_gqa(q, k, v):
        return grouped_query.apply(q, k[key_index], v[key_index], cu_q, cu_k, max_q, max_k, None)

    def cudnn_ragged(q, k, v):
        k, v = k[key_index].repeat_interleave(reps, dim=1), v[key_index].repeat_interleave(reps, dim=1)
        return CudnnRagged.apply(q, k, v, cu_q, cu_k, max_q, max_k)

    # separate rows: each response with its prompt, [rows, H, 640, D], the prompt's queries too (what runs unshared)
    row_len = prompt_len + max(lengths)
    rows = [torch.randn(n, h, row_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for h in (HEADS, KV_HEADS, KV_HEADS)]

    def sdpa_rows(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(*rows, is_causal=True, enable_gqa=True)

    variants = {"flash_repeat": flash_repeat, "flash_gqa": flash_gqa, "cudnn_ragged": cudnn_ragged, "sdpa_rows": sdpa_rows}
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "lengths": args.lengths,
              "query_tokens": total, "key_tokens": int(cu_k[-1]), "segments": len(cu_q) - 1, "max_q": max_q,
              "max_k": max_k, "variants": {}}
    reference = None
    for name, fn in variants.items():
        entry = {}
        try:
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            out = fn(q, k, v)
            out.float().pow(2).sum().backward()
            if name == "flash_repeat":
                reference = (out.detach(), q.grad, k.grad)
            elif name != "sdpa_rows":
                entry["max_abs_diff_out"] = float((out.detach() - reference[0]).abs().max())
                entry["max_abs_diff_dq"] = float((q.grad - reference[1]).abs().max())
                entry["max_abs_diff_dk"] = float((k.grad - reference[2]).abs().max())
            grad = torch.ones_like(out)
            for _ in range(2):
                fn(q, k, v).backward(grad)
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(q, k, v).backward(grad)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            entry["fwd_bwd_ms_median"] = sorted(times)[len(times) // 2]
        except Exception as e:  # noqa: BLE001 - a kernel this torch lacks is a result too
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        result["variants"][name] = entry
        print(name, entry, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
