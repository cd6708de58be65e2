"""The static decoder's Triton kernels on a GPU: grouped-query decode attention, and the pass of the sampler's
two-level draw over the logits.

**Decode attention.** The decoder's other way (`static_decode._attend`) runs two batched matmuls with a softmax
between them: the scores make a round trip through memory in float32, and the matmuls see a "matrix" of G
query heads (7 for Qwen2.5), far from what their tiles are made for. `decode_attention` is flash-decoding for
that layout: one program per (row, K/V head, split of the cache width) loads the row's G query heads once,
streams the width's keys and values tile by tile with an online softmax (float32 statistics, products into a
float32 accumulator), and never writes the scores. When rows are few (after compaction) the width is split
across programs so the GPU stays busy, and a second small kernel merges the splits' partial results. It takes
what `_attend` takes: q [b, H_kv, G, D], keys and values [b, H_kv, W, D] (views into the cache: any strides,
the last dimension contiguous), visible [b, W] bool; it returns [b, H_kv, G, D] in q's dtype. The decoder's
width is a length bucket (one CUDA graph per bucket), rounded up past the cache's last written column; given
`last_column`, a device tensor of one column or one per row that the kernel reads at each launch (so a replayed
graph sees its current value), a row's programs stop there: columns past it are neither read nor attended to,
and a split that starts past it loads nothing. Given `prompt_row` (and `prompt_columns`), the samples of one prompt
read the prompt's columns from one row's cache, not each from its own copy: the same addresses, which the GPU's L2
cache can serve after the first read. The launch (keys per tile, warps per program, pipeline stages, splits) can
be set per call; `_tile` and `num_splits` give the defaults.

**Chunk mass.** `chunk_mass(chunks)` computes `sampling.chunk_mass`: per row of logits cut into chunks
[B, C, K], each chunk's maximum and sum of exp(x - maximum), one program per chunk reading it once.

Both capture into CUDA graphs (no host work but the launch).
"""
from __future__ import annotations

import functools

from winnow.lazy import lazy_import

torch = lazy_import("torch")


def available(device) -> bool:
    """Whether the kernels can run on `device`: a CUDA device and an importable Triton."""
    return getattr(device, "type", device) == "cuda" and _has_triton()


def supports_head_dim(head_dim: int) -> bool:
    """Whether `decode_attention` takes this head dimension: a power of two of at least 16 (tl.dot's tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2_at_least(value: int, floor: int = 16) -> int:
    return max(floor, 1 << (value - 1).bit_length())


@functools.cache
def _attend_kernel():
    """One (row, K/V head, split)'s attention: its G query heads over its share of the width, online softmax.
    Without splits it writes the output; with them, the split's accumulator and (max, sum) for `_merge_kernel`."""
    import triton
    import triton.language as tl

    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, visible_ptr, last_column_ptr, prompt_row_ptr, prompt_columns_ptr, out_ptr,
               part_acc_ptr, part_stat_ptr,
               stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_kw, stride_vb, stride_vh, stride_vw,
               stride_visible, stride_ob, stride_oh, stride_og, stride_last,
               kv_heads, groups, width, split_len, scale,
               G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
               HAS_LAST_COLUMN: tl.constexpr, HAS_PROMPT_ROW: tl.constexpr, PRECISION: tl.constexpr):
        pid, split = tl.program_id(0), tl.program_id(1)
        row, head = pid // kv_heads, pid % kv_heads
        g, d = tl.arange(0, G_PAD), tl.arange(0, D)
        q = tl.load(q_ptr + row * stride_qb + head * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=g[:, None] < groups, other=0.0)
        if HAS_PROMPT_ROW:  # the prompt's columns from the row that holds them for the row's group
            shared_row = tl.load(prompt_row_ptr + row).to(tl.int64)
            prompt_end = tl.load(prompt_columns_ptr).to(tl.int32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, width)
        if HAS_LAST_COLUMN:  # read from memory, not baked in: a captured graph sees its value at each replay
            end = tl.minimum(end, tl.load(last_column_ptr + row * stride_last).to(tl.int32) + 1)
        # A dynamic bound: a split that starts past the end runs no iteration (m -inf, l 0: the merge weighs it 0),
        # and the tile that holds the end loads only up to it.
        for offset in range(start, end, BLOCK_N):
            n = offset + tl.arange(0, BLOCK_N)
            in_range = n < end
            if HAS_PROMPT_ROW:
                source = tl.where(n < prompt_end, shared_row, row)  # [BLOCK_N]: whose cache each column is read from
                k_rows = k_ptr + source[:, None] * stride_kb + head * stride_kh
                v_rows = v_ptr + source[:, None] * stride_vb + head * stride_vh
            else:
                k_rows = k_ptr + row * stride_kb + head * stride_kh
                v_rows = v_ptr + row * stride_vb + head * stride_vh
            k = tl.load(k_rows + n[:, None] * stride_kw + d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N] float32
            seen = tl.load(visible_ptr + row * stride_visible + n, mask=in_range, other=0) != 0
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_rows + n[:, None] * stride_vw + d[None, :], mask=in_range[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SPLIT:
            part = (pid * tl.num_programs(1) + split)
            tl.store(part_acc_ptr + part * G_PAD * D + g[:, None] * D + d[None, :], acc)
            tl.store(part_stat_ptr + part * 2 * G_PAD + g, m_i)
            tl.store(part_stat_ptr + part * 2 * G_PAD + G_PAD + g, l_i)
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + row * stride_ob + head * stride_oh + g[:, None] * stride_og + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g[:, None] < groups)

    return attend


@functools.cache
def _merge_kernel():
    """One (row, K/V head)'s output from its splits' partial results, each weighed by exp(its max - the max)."""
    import triton
    import triton.language as tl

    @triton.jit
    def merge(part_acc_ptr, part_stat_ptr, out_ptr, stride_ob, stride_oh, stride_og, kv_heads, groups,
              G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
        pid = tl.program_id(0)
        row, head = pid // kv_heads, pid % kv_heads
        g, d, s = tl.arange(0, G_PAD), tl.arange(0, D), tl.arange(0, SPLITS)
        stats = part_stat_ptr + (pid * SPLITS + s[:, None]) * 2 * G_PAD + g[None, :]
        m = tl.load(stats)  # [SPLITS, G_PAD]
        l = tl.load(stats + G_PAD)
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp(m - top[None, :])  # a split that saw nothing weighs 0
        total = tl.sum(l * weight, 0)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for i in range(SPLITS):
            w = tl.sum(tl.where(s[:, None] == i, weight, 0.0), 0)  # [G_PAD]
            part = tl.load(part_acc_ptr + (pid * SPLITS + i) * G_PAD * D + g[:, None] * D + d[None, :])
            acc += part * w[:, None]
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_ob + head * stride_oh + g[:, None] * stride_og + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g[:, None] < groups)

    return merge


@functools.cache
def _chunk_mass_kernel():
    """One chunk of one row of logits: its maximum and its sum of exp(x - maximum), reading it once."""
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_mass(x_ptr, peak_ptr, local_ptr, stride_row, num_chunks, width, BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + chunk * width + offsets, mask=offsets < width,
                    other=float("-inf")).to(tl.float32)
        peak = tl.maximum(tl.max(x, 0), -3.4028234663852886e38)  # a chunk of -inf: no NaN
        local = tl.sum(tl.exp(x - peak), 0)
        tl.store(peak_ptr + row * num_chunks + chunk, peak)
        tl.store(local_ptr + row * num_chunks + chunk, local)

    return chunk_mass


@functools.cache
def _rope_cache_kernel():
    """One row's q, k and v from its fused projection: RoPE on the q and k heads, q written out, k and v written
    into the row's cache column."""
    import triton
    import triton.language as tl

    @triton.jit
    def rope_cache(qkv_ptr, cos_ptr, sin_ptr, column_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, stride_cos, stride_q,
                   cache_len, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, ROTATED: tl.constexpr,
                   KV_PAD: tl.constexpr):
        row = tl.program_id(0)
        h = tl.arange(0, ROTATED)[:, None]  # the q heads, then the k heads (padded to a power of two)
        d = tl.arange(0, D)[None, :]
        half: tl.constexpr = D // 2
        # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + row * stride_cos + d).to(tl.float32)
        sin = tl.load(sin_ptr + row * stride_cos + d).to(tl.float32)
        base = qkv_ptr + row * stride_qkv
        rotated = h < HEADS + KV_HEADS
        x = tl.load(base + h * D + d, mask=rotated, other=0.0).to(tl.float32)
        x_partner = tl.load(base + h * D + partner, mask=rotated, other=0.0).to(tl.float32)
        y = x * cos + sign * x_partner * sin
        y = y.to(q_ptr.dtype.element_ty)  # compiled for a GPU: rounded to nearest even, as torch rounds
        tl.store(q_ptr + row * stride_q + h * D + d, y, mask=h < HEADS)
        column = tl.load(column_ptr + row)
        k_head = h - HEADS
        tl.store(k_ptr + ((row * KV_HEADS + k_head) * cache_len + column) * D + d, y, mask=(h >= HEADS) & rotated)
        v_head = tl.arange(0, KV_PAD)[:, None]
        v = tl.load(base + (HEADS + KV_HEADS + v_head) * D + d, mask=v_head < KV_HEADS, other=0.0)
        tl.store(v_ptr + ((row * KV_HEADS + v_head) * cache_len + column) * D + d, v.to(v_ptr.dtype.element_ty),
                 mask=v_head < KV_HEADS)

    return rope_cache


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, column: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One decode token's q, k and v from its fused projection, in one kernel: RoPE (Llama's rotate-half form, in
    float32, rounded once) on q and k; k and v written into each row's cache at its column.

    qkv: [b, (H + 2 H_kv) D], each row's q heads, k heads, v heads; cos, sin: [b, D] (the row's position's);
    k_cache, v_cache: [b, H_kv, L, D] contiguous (a layer's cache, its first b rows); column: [b] integer, where
    row r's k and v go. Returns q [b, H, D] in qkv's dtype."""
    rows = qkv.shape[0]
    kv_heads, cache_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if qkv.shape[1] != (num_heads + 2 * kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"rope_and_cache needs qkv [{rows}, {(num_heads + 2 * kv_heads) * head_dim}] with unit "
                         f"stride, not {tuple(qkv.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos.stride(1) == 1
            and sin.stride() == cos.stride()):
        raise ValueError("rope_and_cache needs contiguous caches and cos, sin with unit stride")
    if not supports_head_dim(head_dim):
        raise ValueError(f"rope_and_cache needs a power-of-two head dimension of at least 16, not {head_dim}")
    q = torch.empty(rows, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel()[(rows,)](
        qkv, cos, sin, column, q, k_cache, v_cache, qkv.stride(0), cos.stride(0), q.stride(0), cache_len,
        HEADS=num_heads, KV_HEADS=kv_heads, D=head_dim, ROTATED=_pow2_at_least(num_heads + kv_heads, 1),
        KV_PAD=_pow2_at_least(kv_heads, 1), num_warps=4)
    return q


SMALL_TILE_BYTES = 32 * 64 * 2 * 2  # num_splits' unit: a 32-key tile of K and V at head dimension 64 in bf16 (8 KiB)


def num_splits(programs: int, width: int, block: int, num_sms: int, tile_bytes: int = SMALL_TILE_BYTES) -> int:
    """How many programs share one (row, head)'s width, a power of two (the merge kernel's constexpr), at most one
    per tile: enough that the programs' K/V tiles in flight reach ~4 tiles of 8 KiB per SM (0.5B's 32 keys x 64
    dimensions of K and V in bf16). `benchmarks/attention_decode.py --launch-sweep` on an H200: at 128 rows, head
    dimension 64 (256 programs) ran fastest in 4 splits, 10.5 us against 11.2 in one; head dimension 128 (256
    programs of 32 KiB tiles) in one, 19.7 us against 23-30 in 2-4. At 512 rows one split was fastest for both."""
    splits = 1
    while programs * splits * tile_bytes < 4 * num_sms * SMALL_TILE_BYTES and splits * 2 * block <= width:
        splits *= 2
    return splits


def _tile(head_dim: int, groups: int) -> tuple[int, int, int | None]:
    """`decode_attention`'s default launch for a shape: (keys per tile, warps per program, pipeline stages; None:
    Triton's default). From `benchmarks/attention_decode.py` on an H200 at 512 rows, widths 256-512: at head
    dimension 64 (Qwen2.5-0.5B) 32 keys, 2 warps and Triton's default stages were within 4% of the best of 144
    launch settings (34.7 us per layer at width 512, best 33.5); at 128 (1.5B, 7B) 64 keys and 4 warps in 2 stages
    took 61.6 us at width 512 for 1.5B and 116.2 us for 7B, against 65.5 and 122.4 us in Triton's default 3."""
    return (32, 2, None) if head_dim <= 64 else (64, 4, 2)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float, *, splits: int | None = None, last_column: torch.Tensor | None = None,
                     prompt_row: torch.Tensor | None = None, prompt_columns: torch.Tensor | None = None,
                     block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked by `visible`) v for one token per row; shapes as the module says.

    splits: programs per (row, K/V head), a power of two; None: `num_splits`'s choice for this GPU.
    last_column: an integer tensor on q's device, one column for all rows or one per row [b]; columns past a
        row's are neither read nor attended to. The kernel reads it from memory, so a captured CUDA graph follows
        its value. None: the whole width.
    prompt_row, prompt_columns: rows whose first columns hold the same keys and values (the samples of one prompt)
        read them from one row: row r reads columns [0, prompt_columns[0]) of keys and values from row
        prompt_row[r] (an integer tensor [b] on q's device, a row index of `keys` and `values`), the rest from its
        own (the decoder's samples of one prompt: the same K/V at the same addresses, which the L2 cache can
        serve). The mask `visible` stays each row's own. Both are read from memory at each launch (a captured
        graph follows them); None: every row reads its own.
    block_n, num_warps: keys per tile (a power of two of at least 16) and warps per program; None: `_tile`'s.
    num_stages: Triton's software-pipelining depth for the loop over tiles; None: `_tile`'s.
    """
    rows, kv_heads, groups, head_dim = q.shape
    width = keys.shape[2]
    # The kernel walks the head dimension with unit stride (the decoder's tensors have it; anything else is copied).
    q, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, keys, values))
    if not supports_head_dim(head_dim):
        raise ValueError(f"decode_attention needs a power-of-two head dimension of at least 16, not {head_dim}")
    default_block, default_warps, default_stages = _tile(head_dim, groups)
    block, num_warps, num_stages = block_n or default_block, num_warps or default_warps, num_stages or default_stages
    if _pow2_at_least(block) != block:  # tl.arange takes powers of two, tl.dot tiles of at least 16
        raise ValueError(f"decode_attention needs block_n a power of two of at least 16, not {block}")
    if last_column is not None and last_column.numel() not in (1, rows):
        raise ValueError(f"last_column holds one column, or one per row ({rows}), not {last_column.numel()}")
    if (prompt_row is None) != (prompt_columns is None):
        raise ValueError("decode_attention takes prompt_row and prompt_columns together")
    if prompt_row is not None and (prompt_row.shape != (rows,) or prompt_row.stride(0) != 1
                                   or prompt_columns.numel() != 1):
        raise ValueError(f"prompt_row needs one contiguous row index per row ({rows}), prompt_columns one column; "
                         f"got {tuple(prompt_row.shape)} and {prompt_columns.numel()}")
    stride_last = last_column.stride(0) if last_column is not None and last_column.numel() > 1 else 0
    g_pad, programs = _pow2_at_least(groups), rows * kv_heads
    if splits is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        splits = num_splits(programs, width, block, num_sms, tile_bytes=2 * block * head_dim * keys.element_size())
    split_len = -(-width // (splits * block)) * block
    out = torch.empty_like(q)
    visible = visible.view(torch.uint8) if visible.dtype == torch.bool else visible
    if splits > 1:
        part_acc = torch.empty(programs * splits * g_pad * head_dim, dtype=torch.float32, device=q.device)
        part_stat = torch.empty(programs * splits * 2 * g_pad, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stat = out  # unused
    _attend_kernel()[(programs, splits)](
        q, keys, values, visible, out if last_column is None else last_column,
        out if prompt_row is None else prompt_row, out if prompt_columns is None else prompt_columns,
        out, part_acc, part_stat,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), visible.stride(0),
        out.stride(0), out.stride(1), out.stride(2), stride_last,
        kv_heads, groups, width, split_len, scale,
        G_PAD=g_pad, D=head_dim, BLOCK_N=block, SPLIT=splits > 1, HAS_LAST_COLUMN=last_column is not None,
        HAS_PROMPT_ROW=prompt_row is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32: no TF32 rounding
        num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    if splits > 1:
        _merge_kernel()[(programs,)](part_acc, part_stat, out, out.stride(0), out.stride(1), out.stride(2),
                                     kv_heads, groups, G_PAD=g_pad, D=head_dim, SPLITS=splits, num_warps=4)
    return out


def chunk_mass(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.chunk_mass` for chunks [B, C, K] (a view of contiguous [B, C * K] logits): the row's largest
    logit [B, 1] and each chunk's mass [B, C], float32."""
    batch_size, num_chunks, width = chunks.shape
    if chunks.stride(2) != 1 or chunks.stride(1) != width:
        raise ValueError("chunk_mass needs each row's chunks back to back in memory")
    peak = torch.empty(batch_size, num_chunks, dtype=torch.float32, device=chunks.device)
    local = torch.empty_like(peak)
    block = _pow2_at_least(width)
    _chunk_mass_kernel()[(batch_size, num_chunks)](chunks, peak, local, chunks.stride(0), num_chunks, width,
                                                   BLOCK=block, num_warps=8 if block >= 4096 else 4)
    top = peak.amax(dim=-1, keepdim=True)
    return top, local * torch.exp(peak - top)
