"""The static decoder's Triton kernels (`engines/kernels.py`), run by Triton's interpreter on CPU: the same
kernel source a GPU compiles. Decode attention: values worked out by hand, agreement with the decoder's matmul
path over splits of the width, left padding and splits that see nothing, and the decoder's tokens with the
kernel in its place. The sampler's chunk mass: agreement with the torch function, chunks of -inf included. (On a
GPU, `benchmarks/attention_decode.py` checks the compiled attention against float64 and times it.)
"""
from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # Before Triton's first import: its language functions are made for the interpreter or for a GPU then.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from winnow.engines import kernels as kernel  # noqa: E402
from winnow.engines.sampling import chunk_mass  # noqa: E402
from winnow.engines.hf import HFEngine, HFEngineConfig  # noqa: E402
from winnow.engines.static_decode import _attend, _Fused, _layer_in_cached  # noqa: E402
from winnow.types import SamplingParams  # noqa: E402


@pytest.fixture
def interpreted():
    """The kernel runs on CUDA tensors where a GPU is, else in Triton's interpreter on CPU tensors."""
    if DEVICE == "cpu":
        from triton import knobs

        assert knobs.runtime.interpret, "Triton was imported before TRITON_INTERPRET was set"


def test_attention_by_hand(interpreted):
    # One row, one head, head dim 16 (scale 1/4). Key 0 is zeros (score 0); key 1 is 4 ln 3 along axis 0 (score
    # ln 3); key 2 would score 100 but is not visible. Weights 1/4 and 3/4: values 4 and 8 give 1 + 6 = 7.
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1.0
    keys = torch.zeros(1, 1, 3, 16)
    keys[0, 0, 1, 0], keys[0, 0, 2, 0] = 4 * math.log(3), 400.0
    values = torch.stack([torch.full((16,), 4.0), torch.full((16,), 8.0), torch.full((16,), -50.0)])[None, None]
    visible = torch.tensor([[True, True, False]])
    q, keys, values, visible = (t.to(DEVICE) for t in (q, keys, values, visible))
    for splits in (1, 2):
        out = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits)
        torch.testing.assert_close(out.cpu(), torch.full((1, 1, 1, 16), 7.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows,kv_heads,groups,head_dim,width,splits", [
    (4, 2, 7, 64, 200, 1),   # Qwen2.5-0.5B's grouping, a width that is no multiple of the tile
    (3, 2, 6, 128, 130, 2),  # Qwen2.5-1.5B's, split in two
    (2, 4, 7, 64, 256, 4),   # four splits, row 1 seeing only the last of them
])
def test_attention_matches_the_matmul_path(interpreted, rows, kv_heads, groups, head_dim, width, splits):
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, rows, kv_heads, 256, head_dim, generator=generator)
    keys, values = cache[0, :, :, :width], cache[1, :, :, :width]  # strided views into a longer cache
    q = torch.randn(rows, kv_heads, groups, head_dim, generator=generator)
    visible = torch.ones(rows, width, dtype=torch.bool)
    visible[0, :50] = False  # left padding
    visible[:, width - 3:] = False  # columns not reached yet
    visible[1, : width - 64] = False  # with 4 splits, row 1's first three see nothing
    cache, q, visible = cache.to(DEVICE), q.to(DEVICE), visible.to(DEVICE)
    keys, values = cache[0, :, :, :width], cache[1, :, :, :width]
    out = kernel.decode_attention(q, keys, values, visible, head_dim**-0.5, splits=splits)
    torch.testing.assert_close(out, _attend(q, keys, values, visible, head_dim**-0.5), atol=1e-5, rtol=0)


def test_attention_takes_any_layout_of_the_head_dimension(interpreted):
    # Queries whose head dimension is not the innermost in memory give what their contiguous copy gives.
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 16, 7, generator=generator).transpose(-1, -2).to(DEVICE)  # [2, 2, 7, 16], stride(-1) 7
    keys, values = (torch.randn(2, 2, 40, 16, generator=generator).to(DEVICE) for _ in range(2))
    visible = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=1)
    torch.testing.assert_close(got, kernel.decode_attention(q.contiguous(), keys, values, visible, 0.25, splits=1))
    torch.testing.assert_close(got, _attend(q, keys, values, visible, 0.25), atol=1e-5, rtol=0)


def _random_attention(seed: int, width: int = 200):
    """Two rows, one K/V head of 3 query heads, head dim 16 (scale 1/4); row 0 left-padded by 3 columns."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, 3, 16, generator=generator)
    keys, values = (torch.randn(2, 1, width, 16, generator=generator) for _ in range(2))
    visible = torch.ones(2, width, dtype=torch.bool)
    visible[0, :3] = False
    return tuple(t.to(DEVICE) for t in (q, keys, values, visible))


@pytest.mark.parametrize("splits", [1, 4])
def test_attention_stops_at_the_last_column(interpreted, splits):
    # Width 200 in tiles of 64; with 4 splits each split is one tile: [0, 64), [64, 128), [128, 192), [192, 200).
    # The last columns: inside the first tile, the last of split 0, the first of split 1 and of split 2, the
    # width's last. Columns past it are visible (as the decoder's key_valid marks them) but must not count.
    q, keys, values, visible = _random_attention(seed=4)
    columns = torch.arange(200, device=DEVICE)
    for last in (5, 63, 64, 128, 199):
        got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits, block_n=64,
                                      last_column=torch.tensor([last], device=DEVICE))
        want = _attend(q, keys, values, visible & (columns <= last), 0.25)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, last=last: f"last column {last}: {m}")


@pytest.mark.parametrize("splits", [1, 4])
def test_each_row_stops_at_its_own_last_column(interpreted, splits):
    # A refilled slot restarts at its prompt's end while an older row runs on: one last column per row. Row 0
    # stops inside split 0, row 1 in split 2; each must match attention over its own columns alone.
    q, keys, values, visible = _random_attention(seed=7)
    columns = torch.arange(200, device=DEVICE)
    last = torch.tensor([20, 150], device=DEVICE)
    got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits, block_n=64, last_column=last)
    want = _attend(q, keys, values, visible & (columns[None] <= last[:, None]), 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for row in (0, 1):  # ... and what a row alone gives with its one column
        alone = kernel.decode_attention(q[row:row + 1], keys[row:row + 1], values[row:row + 1],
                                        visible[row:row + 1], 0.25, splits=splits, block_n=64,
                                        last_column=last[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], alone, atol=1e-6, rtol=0)


def test_attention_reads_nothing_past_the_last_column(interpreted):
    # Keys and values past column 70 are NaN: one read, even weighed 0, would make the output NaN (0 * NaN). The
    # tile [64, 128) holds column 70; with 2 splits of 128 columns, split 1 [128, 200) starts past it.
    q, keys, values, visible = _random_attention(seed=5)
    want = _attend(q, keys[:, :, :71], values[:, :, :71], visible[:, :71], 0.25)
    keys[:, :, 71:], values[:, :, 71:] = float("nan"), float("nan")
    for splits in (1, 2):
        got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits, block_n=64,
                                      last_column=torch.tensor([70], device=DEVICE))
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("splits", [1, 4])
def test_samples_of_one_prompt_read_its_columns_from_one_row(interpreted, splits):
    # Rows 0 and 2 are samples of one prompt of 70 columns (not a whole tile of 64), row 1 of another. Row 2 reads
    # columns [0, 70) from row 0, whose copy it holds; its own copy is NaN here, so one read of it would show.
    # Columns from 70 on stay each row's own, and so does the mask (row 0's left padding is not row 2's).
    q, keys, values, visible = _random_attention(seed=8)
    q, keys, values, visible = (torch.cat([t, t[:1]]) for t in (q, keys, values, visible))
    keys[2, :, 70:] += 1.0  # row 2's response columns differ from row 0's
    visible[2, :3] = True
    want_row_2 = _attend(q[2:], keys[2:], values[2:], visible[2:], 0.25)
    keys[2, :, :70], values[2, :, :70] = float("nan"), float("nan")
    prompt_row, prompt_columns = torch.tensor([0, 1, 0], device=DEVICE), torch.tensor([70], device=DEVICE)
    got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits, block_n=64,
                                  prompt_row=prompt_row, prompt_columns=prompt_columns)
    torch.testing.assert_close(got[2:], want_row_2, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:2], _attend(q[:2], keys[:2], values[:2], visible[:2], 0.25), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="together"):
        kernel.decode_attention(q, keys, values, visible, 0.25, prompt_row=prompt_row)
    with pytest.raises(ValueError, match="one contiguous row index per row"):
        kernel.decode_attention(q, keys, values, visible, 0.25, prompt_row=prompt_row[:2],
                                prompt_columns=prompt_columns)


def test_attention_is_the_same_for_every_tile(interpreted):
    # The tile changes only the order of the sums (the interpreter ignores num_warps; a GPU compiles each).
    q, keys, values, visible = _random_attention(seed=6)
    want = _attend(q, keys, values, visible, 0.25)
    for block_n, num_warps in ((32, 2), (64, 4), (128, 8)):
        for splits in (1, 2):
            got = kernel.decode_attention(q, keys, values, visible, 0.25, splits=splits, block_n=block_n,
                                          num_warps=num_warps)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_n"):
        kernel.decode_attention(q, keys, values, visible, 0.25, splits=1, block_n=48)
    with pytest.raises(ValueError, match="one column"):
        kernel.decode_attention(q, keys, values, visible, 0.25, splits=1, last_column=torch.tensor([3, 4, 5]))


def test_splits_keep_about_four_small_tiles_in_flight_per_multiprocessor():
    assert kernel.num_splits(programs=1024, width=512, block=64, num_sms=132) == 1  # 512 rows x 2 heads: plenty
    assert kernel.num_splits(programs=64, width=640, block=64, num_sms=132) == 8  # 32 rows after compaction
    assert kernel.num_splits(programs=2, width=128, block=64, num_sms=132) == 2  # never more splits than tiles
    assert kernel.num_splits(programs=256, width=512, block=32, num_sms=132) == 4  # 128 rows, head dim 64: 8 KiB
    # 128 rows at head dimension 128: 64-key tiles of K and V hold 32 KiB, four times as much in flight a program
    assert kernel.num_splits(programs=256, width=512, block=64, num_sms=132, tile_bytes=32768) == 1
    assert kernel.num_splits(programs=64, width=512, block=64, num_sms=132, tile_bytes=32768) == 4


@pytest.mark.parametrize("slots", [None, 4])
def test_the_decoder_samples_the_same_tokens_with_the_kernel(interpreted, tiny_model, tiny_tokenizer, slots):
    # Both kernels against the torch path: samples of one prompt read its columns from one row (the kernel's
    # prompt_row), also when 4 slots are refilled and compacted as rows stop; RoPE and the cache writes in one kernel.
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12+34=", "5+7=", "9")]
    stops = [] if slots is None else tiny_tokenizer.convert_tokens_to_ids(["+", "=", "7"])
    params = SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=3, ignore_eos=True, stop_token_ids=stops)
    config = HFEngineConfig(decode="static", attention_bucket=4, dtype="float32", max_batch_size=slots or 0)
    matmul = HFEngine(tiny_model, tiny_tokenizer, config, device=DEVICE)
    matmul.decoder._attend, matmul.decoder._rope_cache = _attend, None  # the torch path (a GPU turns both on)
    fused = HFEngine(tiny_model, tiny_tokenizer, config, device=DEVICE)
    fused.decoder._attend = functools.partial(kernel.decode_attention, splits=2)
    fused.decoder._rope_cache = kernel.rope_and_cache
    for engine in (matmul, fused):
        engine.decoder.min_rows, engine.decoder.check_every = 1, 1
    want, got = matmul.generate(prompts, params), fused.generate(prompts, params)
    assert [c.response_ids for c in got] == [c.response_ids for c in want]
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    if slots:
        assert fused.decoder.refills >= 1 and len({c.num_tokens for c in got}) >= 3


def test_rope_and_cache_writes_what_the_compiled_glue_writes(interpreted):
    # 5 rows of Qwen2.5-1.5B's heads (12 q, 2 k/v) at head dim 16, each writing its k and v at its own column of a
    # 12-column cache: q, k and v as the decoder's torch path computes them, nothing else in the cache touched.
    generator = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, head_dim, cache_len = 5, 12, 2, 16, 12
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    cos, sin = torch.randn(rows, head_dim, generator=generator), torch.randn(rows, head_dim, generator=generator)
    column = torch.tensor([0, 3, 11, 5, 5])
    k_cache = torch.full((rows, kv_heads, cache_len, head_dim), 7.0, device=DEVICE)
    v_cache = k_cache.clone()
    want_k, want_v = k_cache.cpu().clone().view(-1, head_dim), v_cache.cpu().clone().view(-1, head_dim)
    q = kernel.rope_and_cache(*(t.to(DEVICE) for t in (qkv, cos, sin)), k_cache, v_cache, column.to(DEVICE), heads)
    x = qkv.view(rows, 1, -1)
    fused = _Fused(qkv_weight=torch.eye(x.shape[-1]), qkv_sizes=(heads * head_dim,) + (kv_heads * head_dim,) * 2)
    layer = SimpleNamespace(self_attn=SimpleNamespace(), input_layernorm=torch.nn.Identity())
    at = (torch.arange(rows * kv_heads).view(rows, kv_heads) * cache_len + column[:, None]).flatten()
    want_q = _layer_in_cached(layer, x, cos[:, None, None], sin[:, None, None], head_dim, fused, want_k, want_v, at)
    torch.testing.assert_close(q.cpu(), want_q.view(rows, heads, head_dim), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_cache.cpu().view(-1, head_dim), want_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(v_cache.cpu().view(-1, head_dim), want_v, atol=0, rtol=0)
    assert (k_cache.cpu() == 7.0).sum() == (rows * cache_len - rows) * kv_heads * head_dim
    with pytest.raises(ValueError, match="qkv"):
        kernel.rope_and_cache(qkv[:, 1:], cos, sin, k_cache, v_cache, column, heads)


def test_chunk_mass_matches_the_torch_function(interpreted):
    # by hand for one row: chunks [0, ln 3 | -inf, -inf | ln 2, ln 2]: the row's top is ln 3; the masses
    # sum(exp(x - ln 3)) are (1 + 3) / 3, 0 and (2 + 2) / 3.
    logits = torch.tensor([[0.0, math.log(3), float("-inf"), float("-inf"), math.log(2), math.log(2)]])
    top, mass = kernel.chunk_mass(logits.to(DEVICE).view(1, 3, 2))
    torch.testing.assert_close(top.cpu(), torch.tensor([[math.log(3)]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(mass.cpu(), torch.tensor([[4 / 3, 0.0, 4 / 3]]), atol=1e-6, rtol=0)
    # and the torch function's values on random bf16 logits over a chunk width that is no power of two
    logits = (torch.randn(8, 5 * 300, generator=torch.Generator().manual_seed(1)) * 4).bfloat16().to(DEVICE)
    logits[0, :600] = float("-inf")
    for got, want in zip(kernel.chunk_mass(logits.view(8, 5, 300)), chunk_mass(logits.view(8, 5, 300))):
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=0, rtol=1e-5)
