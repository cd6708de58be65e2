"""Decode attention alone (issue 15): one layer's grouped-query attention of one new token per row over a cache
of a given width, the ways the static decoder could compute it, at the 0.5B, 1.5B and 7B shapes (512 rows, or
--rows).

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
    kernel_bounded       the same kernel given `last_column` = width - 65: a cache filled to 64 columns short
                         of the width, as when the decoder's length bucket is rounded up (the columns past it
                         not visible); it reads only the columns up to there (its floor: floor_bounded_us)
    kernel_shared_prompt kernel_bounded with the rows in groups of 8 samples of one 128-column prompt (the GRPO
                         benchmark's): each row reads the prompt's columns from its group's first row
                         (`prompt_row`), as the decoder does (floor_shared_us: each prompt's columns read once)

Each way is captured in a CUDA graph of 20 calls and replayed (no launch overhead in the figure); the floor is
reading the width's K and V once at the measured copy bandwidth.

--sweep also times the kernel at each tile, block_n in (32, 64, 128) keys x num_warps in (2, 4, 8), on every
shape and width; the JSON's `sweep` key holds each tile's time and error per cell, and the printed table names
the fastest tile per cell beside the default's (`kernels._tile`). The splits follow block_n (`num_splits`):
512 rows are programs enough for one split per row and K/V head, so the split path is timed with fewer rows,
as after compaction (--rows 32).

    PYTHONPATH=$PWD python benchmarks/attention_decode.py --sweep --out attention_decode_sweep.json

--launch-sweep times the kernel as the decoder calls it (each row's own last column, the cache filled to
BOUNDED_SHORT columns short of the width) at every launch setting: block_n in (16, 32, 64) x num_warps in
(1, 2, 4) x num_stages in (1, 2, 3, 4) x splits in (1, 2, 4, 8). The JSON's `launch_sweep` key holds every
setting's time per cell; the printed table names the fastest per cell beside the default's.

    PYTHONPATH=$PWD python benchmarks/attention_decode.py --launch-sweep --widths 256,512 --out launch.json
"""
from __future__ import annotations

import argparse
import functools
import itertools
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
BOUNDED_SHORT = 64  # kernel_bounded: the cache ends this many columns before the width (half a 128 bucket)
PROMPT_COLUMNS, SAMPLES = 128, 8  # kernel_shared_prompt: the prompt's columns, the rows that share them
SWEEP_BLOCKS, SWEEP_WARPS = (32, 64, 128), (2, 4, 8)
LAUNCH_SWEEP = {"block_n": (16, 32, 64), "num_warps": (1, 2, 4), "num_stages": (1, 2, 3, 4), "splits": (1, 2, 4, 8)}


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


def floor_us(shape: str, rows: int, columns: int, element_size: int, bandwidth: float) -> float:
    """Microseconds to read `columns` columns of K and V once at the copy bandwidth (bytes per second)."""
    kv_heads, _, head_dim = SHAPES[shape]
    return 1e6 * 2 * rows * kv_heads * columns * head_dim * element_size / bandwidth


def measure(fn, inputs, want, device) -> dict:
    """One way on one cell: its time and largest difference from float64 attention, or the error it raised."""
    try:
        error = (fn(*inputs).double() - want).abs().max().item()
        return {"us": time_way(fn, inputs, device), "max_abs_error": error}
    except Exception as exc:  # a backend that does not take this layout: say so, go on
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def bounded(inputs, per_row: bool = False):
    """kernel_bounded's call and inputs: the cache filled to BOUNDED_SHORT columns short of the width, the
    columns past its end not visible (as the decoder's mask has them) and not read (`last_column`: one for all
    rows, or with `per_row` one per row, as the decoder passes it)."""
    q, keys, values, visible, scale = inputs
    width = keys.shape[2]
    last_column = torch.full((q.shape[0] if per_row else 1,), width - BOUNDED_SHORT - 1, dtype=torch.long,
                             device=q.device)
    visible = visible.clone()
    visible[:, width - BOUNDED_SHORT:] = False
    return functools.partial(kernels.decode_attention, last_column=last_column), (q, keys, values, visible, scale)


def shared_prompt(inputs):
    """kernel_shared_prompt's call and inputs: kernel_bounded's, with rows in groups of SAMPLES whose first
    PROMPT_COLUMNS columns of keys and values (and mask) are their group's first row's, read from there."""
    fn, (q, keys, values, visible, scale) = bounded(inputs)
    rows = q.shape[0]
    first = torch.arange(rows, device=q.device) // SAMPLES * SAMPLES
    keys, values = keys.clone(), values.clone()  # contiguous copies: the originals stay as they were
    keys[:, :, :PROMPT_COLUMNS] = keys[first, :, :PROMPT_COLUMNS]
    values[:, :, :PROMPT_COLUMNS] = values[first, :, :PROMPT_COLUMNS]
    visible[:, :PROMPT_COLUMNS] = visible[first, :PROMPT_COLUMNS]
    columns = torch.tensor([PROMPT_COLUMNS], device=q.device)
    return (functools.partial(fn, prompt_row=first, prompt_columns=columns),
            (q, keys, values, visible, scale))


def cell(shape: str, width: int, inputs, want, table: dict, device, bandwidth: float) -> dict:
    """Every way of the table (and kernel_bounded where the kernel is one) at one shape and width."""
    rows, element_size = inputs[0].shape[0], inputs[1].element_size()
    row = {"shape": shape, "rows": rows, "width": width,
           "floor_us": floor_us(shape, rows, width, element_size, bandwidth), "ways": {}}
    for name, fn in table.items():
        if name == "flex" and width != 512:  # one compile per width: measured at one
            continue
        row["ways"][name] = measure(fn, inputs, want, device)
    if "kernel" in table and width > BOUNDED_SHORT:
        fn, bounded_inputs = bounded(inputs)
        row["ways"]["kernel_bounded"] = measure(fn, bounded_inputs, reference(*bounded_inputs), device)
        row["floor_bounded_us"] = floor_us(shape, rows, width - BOUNDED_SHORT, element_size, bandwidth)
    if "kernel" in table and width - BOUNDED_SHORT > PROMPT_COLUMNS and rows % SAMPLES == 0:
        fn, shared_inputs = shared_prompt(inputs)
        row["ways"]["kernel_shared_prompt"] = measure(fn, shared_inputs, reference(*shared_inputs), device)
        columns = rows * (width - BOUNDED_SHORT - PROMPT_COLUMNS) + rows // SAMPLES * PROMPT_COLUMNS
        row["floor_shared_us"] = floor_us(shape, 1, columns, element_size, bandwidth)
    return row


def sweep_cell(shape: str, width: int, inputs, want, device) -> dict:
    """The kernel at every tile of the sweep on one cell: each tile's time and error, the fastest, the default."""
    _, groups, head_dim = SHAPES[shape]
    tiles = []
    for block_n, num_warps in itertools.product(SWEEP_BLOCKS, SWEEP_WARPS):
        fn = functools.partial(kernels.decode_attention, block_n=block_n, num_warps=num_warps)
        tiles.append({"block_n": block_n, "num_warps": num_warps, **measure(fn, inputs, want, device)})
    timed = [tile for tile in tiles if "us" in tile]
    default = kernels._tile(head_dim, groups)
    return {"shape": shape, "rows": inputs[0].shape[0], "width": width, "tiles": tiles,
            "best": min(timed, key=lambda tile: tile["us"]) if timed else None,
            "default": next((tile for tile in tiles if (tile["block_n"], tile["num_warps"]) == default), None)}


def launch_sweep_cell(shape: str, width: int, inputs, device, bandwidth: float) -> dict:
    """The kernel as the decoder calls it (`bounded`, a last column per row) at every launch setting of
    LAUNCH_SWEEP: each setting's time, the fastest, and the default's (every setting left to the kernel)."""
    call, args = bounded(inputs, per_row=True)
    want = reference(*args)
    settings = [dict(zip(LAUNCH_SWEEP, values)) for values in itertools.product(*LAUNCH_SWEEP.values())]
    timed = [{**setting, **measure(functools.partial(call, **setting), args, want, device)}
             for setting in [{}] + settings]
    ok = [entry for entry in timed[1:] if "us" in entry]
    rows = inputs[0].shape[0]
    return {"shape": shape, "rows": rows, "width": width, "last_column": width - BOUNDED_SHORT - 1,
            "floor_us": floor_us(shape, rows, width - BOUNDED_SHORT, inputs[1].element_size(), bandwidth),
            "default": timed[0], "best": min(ok, key=lambda entry: entry["us"]) if ok else None,
            "settings": timed[1:]}


def print_launch_sweep(sweep: list[dict]) -> None:
    print("\nlaunch sweep (block_n, num_warps, num_stages, splits): the fastest per cell, the default, the floor")
    for entry in sweep:
        best, default = entry["best"], entry["default"]
        best_text = (f"{best['block_n']}/{best['num_warps']}/{best['num_stages']}/{best['splits']} "
                     f"{best['us']:.1f} us" if best else "every setting failed")
        default_text = f"{default['us']:.1f} us" if "us" in default else "failed"
        print(f"{entry['shape']:>5} rows {entry['rows']:>4} width {entry['width']:>4}: best {best_text}; "
              f"default {default_text}; floor {entry['floor_us']:.1f} us", flush=True)


def print_sweep(sweep: list[dict]) -> None:
    """One line per (shape, width): the fastest tile and its time beside the default tile's."""
    def name(tile):
        if tile is None:
            return "not in the sweep"
        us = f"{tile['us']:.1f} us" if "us" in tile else "failed"
        return f"{tile['block_n']} keys x {tile['num_warps']} warps {us}"
    print("\ntile sweep (block_n x num_warps): the fastest per cell, then the default")
    for entry in sweep:
        best = name(entry["best"]) if entry["best"] else "every tile failed"
        print(f"{entry['shape']:>5} width {entry['width']:>4}: best {best}; default {name(entry['default'])}")


def failures(results: list[dict], sweep: list[dict]) -> list[str]:
    """What makes the run fail: the decoder's kernel failing on a cell, every way of a cell failing, or every
    tile of a sweep cell failing (nothing to compare against)."""
    failed = {name for row in results for name, way in row["ways"].items()
              if "error" in way and (name.startswith("kernel") or not any("us" in w for w in row["ways"].values()))}
    failed |= {f"sweep {entry['shape']} width {entry['width']}" for entry in sweep if entry["best"] is None}
    return sorted(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--shapes", default="0.5b,1.5b,7b")
    parser.add_argument("--widths", default="256,512,640")
    parser.add_argument("--rows", type=int, default=None, help="rows per call (default 512; 16 with --cpu)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at each tile (GPU only)")
    parser.add_argument("--launch-sweep", action="store_true",
                        help="only the kernel, at every launch setting, as the decoder calls it (GPU only)")
    args = parser.parse_args()
    if (args.sweep or args.launch_sweep) and args.cpu:
        parser.error("--sweep and --launch-sweep time the compiled Triton kernel: they need a GPU")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    rows = args.rows or (16 if args.cpu else 512)
    bandwidth = common.measure_ceilings(device)["bandwidth_gbps"] * 1e9
    table, results, sweep = ways(compile_ok=not args.cpu), [], []
    if args.launch_sweep:
        launch = [launch_sweep_cell(shape, width, inputs_for(shape, rows, width, 640, device, dtype), device,
                                    bandwidth)
                  for shape in args.shapes.split(",") for width in map(int, args.widths.split(","))]
        print_launch_sweep(launch)
        Path(args.out).write_text(json.dumps({**common.environment(device), "launch_sweep": launch}, indent=1))
        return
    for shape in args.shapes.split(","):
        for width in map(int, args.widths.split(",")):
            inputs = inputs_for(shape, rows, width, 640, device, dtype)
            want = reference(*inputs)
            row = cell(shape, width, inputs, want, table, device, bandwidth)
            results.append(row)
            cells = ", ".join(f"{n} {w['us']:.1f}" if "us" in w else f"{n} -" for n, w in row["ways"].items())
            bounded_floor = f" (bounded {row['floor_bounded_us']:.1f})" if "floor_bounded_us" in row else ""
            print(f"{shape} width {width}: floor {row['floor_us']:.1f}{bounded_floor} us; {cells}", flush=True)
            if args.sweep:
                sweep.append(sweep_cell(shape, width, inputs, want, device))
    if args.sweep:
        print_sweep(sweep)
    report = {**common.environment(device), "results": results, **({"sweep": sweep} if args.sweep else {})}
    Path(args.out).write_text(json.dumps(report, indent=1))
    failed = failures(results, sweep)
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed ({args.out} holds the errors)")


if __name__ == "__main__":
    main()
