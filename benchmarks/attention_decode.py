"""Decode attention alone (issue 15): one layer's grouped-query attention of one new token per row over a cache
of a given width, the ways the static decoder could compute it, at the 0.5B, 1.5B and 7B shapes (512 rows).

    PYTHONPATH=$PWD python benchmarks/attention_decode.py --out attention_decode.json
    PYTHONPATH=$PWD python benchmarks/attention_decode.py --cpu --out /tmp/attention_decode.json   # a dry run

Ways (each checked against float64 attention before it is timed):
    matmul_glue_dynamic  two batched matmuls, the scale/mask/softmax between them compiled with dynamic shapes
                         (the decoder's `_attend` as it is)
    matmul_glue_static   the same compiled for each width
    sdpa_<backend>       F.scaled_dot_product_attention on queries [b, H_kv, G, D] (the G query heads that share
                         a K/V head are its "sequence"), the row's visible columns as a boolean mask; backends
                         efficient, cudnn, math
    flex                 FlexAttention on the same layout, the mask as a score_mod reading the visible columns
                         (width 512 only: it compiles once per width)
    kernel               winnow's flash-decoding Triton kernel (`engines/kernels.py`), which the decoder
                         uses on a GPU

Each way is captured in a CUDA graph of 20 calls and replayed (no launch overhead in the figure); the floor is
reading the width's K and V once at the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import grpo_common as common  # noqa: E402
from winnow.engines import kernels  # noqa: E402
from winnow.engines.static_decode import _attend  # noqa: E402

SHAPES = {"0.5b": (2, 7, 64), "1.5b": (2, 6, 128), "7b": (4, 7, 128)}  # H_kv, G, D
BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}


def ways(compile_ok: bool) -> dict:
    table = {"kernel": kernels.decode_attention} if compile_ok else {}
    if compile_ok:
        dynamic, static = torch.compile(_attend, dynamic=True), torch.compile(_attend, dynamic=False)
        table["matmul_glue_dynamic"] = lambda q, k, v, visible, scale: dynamic(q, k, v, visible, scale)
        table["matmul_glue_static"] = lambda q, k, v, visible, scale: static(q, k, v, visible, scale)
    else:
        table["matmul_glue_eager"] = _attend
    for name, backend in BACKENDS.items():
        def sdpa(q, k, v, visible, scale, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
        table[f"sdpa_{name}"] = sdpa
    if compile_ok:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def flex_way(q, k, v, visible, scale):
            def mask(score, b, h, q_idx, kv_idx):
                return torch.where(visible[b, kv_idx], score, -float("inf"))
            return flex(q, k, v, score_mod=mask, scale=scale)
        table["flex"] = flex_way
    return table


def reference(q, k, v, visible, scale):
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1), v.double())


def time_way(fn, inputs, device) -> float:
    """Microseconds per call: 20 calls captured in one CUDA graph, replayed 10 times (eagerly timed on CPU)."""
    for _ in range(3):
        fn(*inputs)
    if device.type != "cuda":
        return 1e6 * common.timed(device, lambda: [fn(*inputs) for _ in range(5)])[0] / 5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn(*inputs)
    graph.replay()
    seconds, _ = common.timed(device, lambda: [graph.replay() for _ in range(10)])
    return 1e6 * seconds / 200


def inputs_for(shape: str, rows: int, width: int, cache_len: int, device, dtype):
    kv_heads, groups, head_dim = SHAPES[shape]
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(rows, kv_heads, groups, head_dim, device=device, dtype=dtype, generator=generator)
    cache = torch.randn(2, rows, kv_heads, cache_len, head_dim, device=device, dtype=dtype, generator=generator)
    keys, values = cache[0, :, :, :width], cache[1, :, :, :width]  # strided views, as in the decoder
    visible = torch.ones(rows, width, dtype=torch.bool, device=device)
    visible[: rows // 2, : width // 8] = False  # left padding on half the rows
    visible[:, width - 3:] = False  # columns not reached yet
    return q, keys, values, visible, head_dim**-0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--shapes", default="0.5b,1.5b,7b")
    parser.add_argument("--widths", default="256,512,640")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    rows = 16 if args.cpu else 512
    bandwidth = common.measure_ceilings(device)["bandwidth_gbps"] * 1e9
    table, results = ways(compile_ok=not args.cpu), []
    for shape in args.shapes.split(","):
        for width in map(int, args.widths.split(",")):
            inputs = inputs_for(shape, rows, width, 640, device, dtype)
            want = reference(*inputs)
            kv_heads, _, head_dim = SHAPES[shape]
            floor_us = 1e6 * 2 * rows * kv_heads * width * head_dim * inputs[1].element_size() / bandwidth
            row = {"shape": shape, "rows": rows, "width": width, "floor_us": floor_us, "ways": {}}
            for name, fn in table.items():
                if name == "flex" and width != 512:  # one compile per width: measured at one
                    continue
                try:
                    got = fn(*inputs)
                    error = (got.double() - want).abs().max().item()
                    row["ways"][name] = {"us": time_way(fn, inputs, device), "max_abs_error": error}
                except Exception as exc:  # a backend that does not take this layout: say so, go on
                    row["ways"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            results.append(row)
            cells = ", ".join(f"{n} {w['us']:.1f}" if "us" in w else f"{n} -" for n, w in row["ways"].items())
            print(f"{shape} width {width}: floor {floor_us:.1f} us; {cells}", flush=True)
    Path(args.out).write_text(json.dumps({**common.environment(device), "results": results}, indent=1))
    failed = sorted({name for row in results for name, way in row["ways"].items()
                     if "error" in way and (name == "kernel" or not any("us" in w for w in row["ways"].values()))})
    if failed:  # the decoder's own kernel, or every way of a cell: nothing to compare against
        raise SystemExit(f"{', '.join(failed)} failed ({args.out} holds the errors)")


if __name__ == "__main__":
    main()
