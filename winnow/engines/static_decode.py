"""A fixed-shape decode loop for Llama-family models, replayed as CUDA graphs on GPU.

Why not `model.generate` or the transformers forward with a `StaticCache`: at RL batch sizes (hundreds of
rows) decode is bound by per-token host work and by attention that the generic path runs badly:
- every forward walks ~30 Python modules per layer and launches ~700 small kernels per token;
- with a padding mask, the SDPA path repeats grouped-query K/V to every head over the *whole* cache
  length (for Qwen2.5-0.5B at 512 rows x 640 positions: ~60 GB of copies per token).

This module keeps the model's own submodules (embeddings, norms, projections, MLP, rotary tables, so any
Llama-family variant with its biases, q/k norms or RoPE scaling computes what transformers computes) and
replaces only the glue around them:
- one decode step reads every input from preallocated buffers and advances them itself (per row: the token to
  feed, its position, its cache column, its output column), so it can be captured once as a CUDA graph and
  replayed with no host work or sync per token;
- projections that read the same input run as one matmul: q/k/v, and the MLP's gate/up (the parameters become
  views of one buffer per layer, so an in-place weight sync reaches the fused matmuls and nothing is stored twice);
- attention is grouped-query by reshaping queries to [B, H_kv, G, D] (no K/V expansion) and reads only the
  cache columns up to a length bucket (a multiple of `bucket` tokens; one graph per bucket), so early
  tokens do not pay for the whole cache; on a GPU it is one flash-decoding kernel (`kernels.decode_attention`),
  which reads each row's cache only up to its column (a device counter), not to the end of the bucket, and the
  samples of one prompt read its columns from one row of theirs (`prompt_row`), not each from its own copy;
- on a GPU, RoPE and the K/V cache writes after a layer's fused q/k/v projection run as one kernel
  (`kernels.rope_and_cache`);
- sampling is the engine's one sampler (`sampling.Sampler`, also used by the `hf` path, so one seed gives
  the same tokens on both): an inverse-CDF draw from softmax(logits/T) with one keyed uniform per row, a
  fixed-shape, sync-free computation; the row keys are a buffer (they move with their rows when rows are
  compacted) and the decode step is the row's output column, a device counter the step advances itself.
Stop tokens are handled on the GPU. Stop strings and "is every row done?" are checked on the host every
`check_every` tokens; a row that stops keeps its tokens only up to the stop (what runs after it is cut).
At those checks, once at most half the rows still run, the running rows are moved to the front of every
buffer and the step continues on half as many rows (graphs are captured at a shape's first use), so
finished rows stop costing decode work; the outputs are put back in row order at the end.
A call with more requests than slots (`max_rows`) keeps the rest waiting: at those checks, once an eighth of the
slots (or every waiting request's worth) have finished, their outputs are copied out and waiting requests are
prefilled into them, starting again at column S of their slot while the other rows run on (refill). The attention
width follows the row that has run longest; each row's own column bounds what it reads. The prefill runs in
chunks of distinct prompts within `prefill_memory`.

On CPU the same step runs eagerly (no graphs): the tests check it against the transformers forward there.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from winnow.lazy import inference_mode, lazy_import
from winnow.engines import kernels
from winnow.engines.sampling import Sampler
from winnow.types import SamplingParams

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
"""architectures whose decoder layers this module drives (Llama-style: pre-norm, RoPE, GQA, gated MLP)"""


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why `StaticDecoder` cannot drive `model`, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention is not implemented in the static decoder"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the Llama layout (model.embed_tokens, layers, norm, rotary_emb)"
    return None


_BUFFERS = ("k_cache", "v_cache", "cos_table", "sin_table", "columns", "key_valid", "feed", "position", "column",
            "out_column", "out_tokens", "out_logprobs", "lengths", "is_done", "stop_ids", "pad_token", "row_map",
            "row_keys", "prompt_id", "prompt_row", "prompt_columns")
"""what `_prepare` allocates and `release` frees"""
_STEP_STATE = ("feed", "position", "column", "out_column", "out_tokens", "out_logprobs", "lengths", "is_done")
"""the buffers a step writes besides the KV cache (saved and restored around a graph capture)"""


class StaticDecoder:
    """Batched sampling with per-token logprobs over preallocated buffers, one fixed-shape step per token.

    Buffers and graphs are kept between calls with the same (rows, cache length, max_tokens, sampler) and
    rebuilt otherwise; weights are read from the model's parameters, so an in-place weight sync is seen
    by the captured graphs with no recapture. `release()` frees them (the engine's `sleep`).
    """

    def __init__(self, model: torch.nn.Module, *, use_graphs: bool, bucket: int = 128, check_every: int = 16,
                 compile: bool = False, min_rows: int | None = 32, attention_kernel: bool | None = None):
        if reason := unsupported_reason(model):
            raise ValueError(f"static decode cannot run this model: {reason}; use decode='hf'")
        self.model, self.body = model, model.model
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.use_graphs, self.bucket, self.check_every = use_graphs, bucket, check_every
        self.min_rows = min_rows  # compaction never shrinks the active rows below this; None turns it off
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._key: tuple | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (active rows, width) -> graph
        self._pool = None
        self.last_capture_seconds = 0.0
        self.decode_steps = self.row_steps = self.refills = 0  # totals over calls: steps, rows x steps, refills
        self.prefill_memory: int | None = None  # bytes the prefill's activations may take at once; None: no limit
        # The decode step's per-layer glue around attention (norms, projections, RoPE, the K/V cache write, MLP,
        # residuals) is ~35 small kernels per layer eagerly; compiled, it fuses to a few. Prefill stays eager
        # (its shapes change with every prompt length).
        # Static shapes first; a second row count (compaction) compiles once more with the rows symbolic, which
        # then serves every later row count and model shape (not one compile each, which would reach dynamo's
        # recompile limit and fall back to eager).
        # q/k/v and gate/up as one matmul each: at decode's few hundred rows the separate k and v projections
        # (N = 128 for Qwen2.5-0.5B) are launches that barely use the GPU.
        self._fused = [_fuse_layer(layer) for layer in self.body.layers]
        self._layer_in = torch.compile(_layer_in_cached, dynamic=None) if compile else _layer_in_cached
        self._layer_out = torch.compile(_layer_out, dynamic=None) if compile else _layer_out
        # Attention: on a GPU with Triton, one flash-decoding kernel (`kernels.decode_attention`); otherwise two
        # batched matmuls with the softmax glue (scale, mask, fp32 softmax, cast back) between them, compiled into one
        # kernel when asked (dynamic: its shapes change with every attention width and active row count).
        if attention_kernel is None:
            attention_kernel = kernels.available(self.device) and kernels.supports_head_dim(self.head_dim)
        if attention_kernel:
            self._attend = kernels.decode_attention
        else:
            self._attend = torch.compile(_attend, dynamic=True) if compile else _attend
        # With the kernels, a layer with a fused q/k/v (and no q/k norms) runs its input as the compiled norm and
        # projection, then one kernel for RoPE and the K/V cache writes (`kernels.rope_and_cache`): compiled alone,
        # the three differently sized parts (q, k, v) take three kernels.
        self._rope_cache = kernels.rope_and_cache if attention_kernel else None
        self._layer_proj = torch.compile(_layer_in_projected, dynamic=None) if compile else _layer_in_projected

    # ------------------------------------------------------------------ public

    @inference_mode
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams, *,
        stop_ids: list[int], pad_token_id: int, row_keys: torch.Tensor, stop_checker=None,
        max_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode up to `params.max_tokens` tokens after each left-padded prompt of `input_ids` [R, S]; request
        r samples with key row_keys[r] ([R] int64, `sampling.row_keys`).

        At most `max_rows` requests (None: all) decode together, one slot each. The others wait in order and
        take the slots of finished rows at the next check (refill), so a long response holds one slot, not a
        whole batch of finished ones.

        Returns (tokens [R, N] long, logprobs [R, N] float32, lengths [R] long, is_done [R] bool) on the
        device, N = max_tokens; request r's response is tokens[r, :lengths[r]], and is_done says it stopped.
        """
        num_requests, prompt_len = input_ids.shape
        rows = min(num_requests, max_rows or num_requests)
        max_tokens = params.max_tokens
        cache_len = _round_up(prompt_len + max_tokens, self.bucket)
        stops = tuple(sorted(set(stop_ids)))
        sampler = Sampler.of(params, fused=True)  # its pass over the logits as a Triton kernel where one runs
        self._fuse_replaced_layers()
        self._prepare(rows, cache_len, max_tokens, sampler, stops, pad_token_id)
        self._reset(input_ids, attention_mask, row_keys)
        self._prefill(torch.arange(rows, device=self.device), step=0)
        finish_steps = {max_tokens - 1}  # where a group of rows started together reaches max_tokens
        step, has_stops = 0, bool(stops) or stop_checker is not None
        while True:
            if step in finish_steps or (step > 0 and step % self.check_every == 0):
                if stop_checker is not None:
                    self._check_stop_strings(stop_checker)
                if has_stops or self.num_waiting or step in finish_steps:
                    num_running = int(self._running()[: self.active].sum())
                    if self.num_waiting:
                        if self._refill(num_running, step):
                            finish_steps.add(step + max_tokens - 1)
                            continue  # look again: rows of a 1-token call finish at their prefill
                    elif num_running == 0:
                        break
                    else:
                        self._compact(num_running)
            step += 1
            width = self._width(step)
            if self.use_graphs:
                self._graph(width).replay()
            else:
                self._step(width)
            self.decode_steps, self.row_steps = self.decode_steps + 1, self.row_steps + self.active
        if stop_checker is not None:
            self._check_stop_strings(stop_checker)
        self._harvest(torch.arange(rows, device=self.device))
        return self._results

    @property
    def num_waiting(self) -> int:
        """Requests of the current call that have not had a slot yet."""
        return self._requests[0].shape[0] - self._next_request

    def release(self) -> None:
        """Free the KV cache, the buffers and the graphs (they are rebuilt by the next call)."""
        self._graphs.clear()
        self._key, self._pool = None, None
        for name in _BUFFERS:
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def bytes_per_row(self, max_len: int) -> int:
        """An estimate of the device memory one row of a call takes, prompt and response `max_len` tokens:
        its K/V cache, its share of the step's logits and sampling, its outputs (the prefill's activations are
        apart, `prefill_bytes_per_prompt`, and so are the RoPE tables the rows share)."""
        config, size = self.model.config, torch.finfo(self.dtype).bits // 8
        cache_len = _round_up(max_len, self.bucket)
        kv = 2 * len(self.body.layers) * self.num_kv_heads * self.head_dim * cache_len * size
        logits = config.vocab_size * (size + 8)  # the step's logits and the sampler's float32 passes over them
        outputs = max_len * 16  # out_tokens (int64) and out_logprobs (float32), rounded up
        return kv + logits + outputs + cache_len  # and the row's key_valid

    def prefill_bytes_per_prompt(self, prompt_len: int) -> int:
        """An estimate of the activations one distinct prompt of `prompt_len` tokens takes in the prefill (a
        layer's hidden states, q/k/v, attention output and MLP intermediates)."""
        config, size = self.model.config, torch.finfo(self.dtype).bits // 8
        return prompt_len * (3 * config.intermediate_size + 6 * config.hidden_size) * size

    def buffer_bytes(self) -> int:
        """Device memory the decoder's buffers take now (0 when released)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _BUFFERS
                   if name in self.__dict__)

    def _fuse_replaced_layers(self) -> None:
        """Fuse again any layer whose projections no longer live in its fused buffers (something assigned new
        tensors to them, e.g. `model.to()`): an in-place weight sync keeps them there, an assignment would leave
        the fused matmuls on stale weights."""
        for index, layer in enumerate(self.body.layers):
            if not _fuse_intact(layer, self._fused[index]):
                with torch.inference_mode(False), torch.no_grad():
                    self._fused[index] = _fuse_layer(layer)
                self._graphs.clear()  # captured graphs read the old buffers

    # ------------------------------------------------------------------ buffers

    def _prepare(self, batch_size: int, cache_len: int, max_tokens: int, sampler: Sampler,
                 stop_ids: tuple[int, ...], pad: int) -> None:
        # What a captured step bakes in: a new combination captures new graphs.
        key = (batch_size, cache_len, max_tokens, sampler, stop_ids, pad)
        if key == self._key:
            return
        self.release()
        device, num_layers = self.device, len(self.body.layers)
        shape = (num_layers, batch_size, self.num_kv_heads, cache_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        # The model's own rotary module gives the tables, so RoPE scaling variants come for free.
        positions = torch.arange(cache_len, device=device)[None]
        cos, sin = self.body.rotary_emb(self.k_cache[0, :1, 0], positions)  # [1, L, D] each, model dtype
        self.cos_table, self.sin_table = cos[0], sin[0]
        self.columns = torch.arange(cache_len, device=device)
        # Every slot has its own counters: a slot refilled mid-call starts again at its prompt's end.
        self.key_valid = torch.ones(batch_size, cache_len, dtype=torch.bool, device=device)
        self.feed = torch.zeros(batch_size, dtype=torch.long, device=device)  # the token to feed next
        self.position = torch.zeros(batch_size, dtype=torch.long, device=device)  # its RoPE position
        self.column = torch.zeros(batch_size, dtype=torch.long, device=device)  # its cache column
        self.out_column = torch.zeros(batch_size, dtype=torch.long, device=device)  # where the next token goes
        # One column past max_tokens: rows that no longer run write there, not over their response.
        self.out_tokens = torch.zeros(batch_size, max_tokens + 1, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(batch_size, max_tokens + 1, dtype=torch.float32, device=device)
        self.lengths = torch.full((batch_size,), max_tokens, dtype=torch.long, device=device)
        self.is_done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.row_map = torch.arange(batch_size, device=device)  # slot -> its request (compaction permutes)
        self.row_keys = torch.zeros(batch_size, dtype=torch.long, device=device)  # sampling key of each slot
        # Samples of one prompt share its K/V: each slot's prompt (one id per distinct prompt of a prefill, whose
        # slots got the same K/V bytes), the active slot the kernel reads its prompt columns from, and how many
        # columns that is (the call's padded prompt length).
        self.prompt_id = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.prompt_row = torch.arange(batch_size, device=device)
        self.prompt_columns = torch.zeros(1, dtype=torch.long, device=device)
        self.stop_ids = torch.tensor(stop_ids or [-1], dtype=torch.long, device=device)
        self.pad_token = torch.tensor(pad, dtype=torch.long, device=device)
        self.sampler = sampler
        self._key = key

    def _reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_keys: torch.Tensor) -> None:
        """Start a call: its requests wait in order; the results have a row per request."""
        rows, max_tokens = self.feed.shape[0], self.out_tokens.shape[1] - 1
        num_requests = input_ids.shape[0]
        self._requests = (input_ids, attention_mask, row_keys.to(self.device))
        self._next_request = 0
        self._num_prompts = 0  # distinct prompts prefilled so far in this call (the next prompt id)
        self.prompt_columns.fill_(input_ids.shape[1])
        self._results = (self.pad_token.expand(num_requests, max_tokens).clone(),
                         torch.zeros(num_requests, max_tokens, device=self.device),
                         torch.full((num_requests,), max_tokens, device=self.device),
                         torch.zeros(num_requests, dtype=torch.bool, device=self.device))
        self.active = rows  # rows the step runs on: slots [0, active)
        self._starts = torch.zeros(rows, dtype=torch.long)  # host: the step each slot's request was prefilled at
        self._oldest = 0  # host: the earliest of those among the active slots (the attention width follows it)
        self._checked = torch.zeros(rows, dtype=torch.long)  # host: output columns checked for stop strings
        self.last_capture_seconds = 0.0

    def _running(self) -> torch.Tensor:
        """[slots] bool: the rows that sample a token at the next step (not stopped, short of max_tokens)."""
        return ~self.is_done & (self.out_column < self.out_tokens.shape[1] - 1)

    def _refill(self, num_running: int, step: int) -> bool:
        """Give waiting requests the slots of finished rows, once enough are free to be worth a prefill (an
        eighth of the slots, or every waiting request). Returns whether it did."""
        free = self.active - num_running
        if free == 0 or free < min(self.num_waiting, max(1, self.active // 8)):
            return False
        slots = (~self._running()[: self.active]).nonzero().flatten()
        self._harvest(slots)
        self._prefill(slots[: self.num_waiting], step)
        self.refills += 1
        return True

    def _harvest(self, slots: torch.Tensor) -> None:
        """Copy what the rows in `slots` sampled to their requests' rows of the results."""
        requests, max_tokens = self.row_map[slots], self.out_tokens.shape[1] - 1
        tokens, logprobs, lengths, is_done = self._results
        tokens[requests] = self.out_tokens[slots, :max_tokens]
        logprobs[requests] = self.out_logprobs[slots, :max_tokens]
        lengths[requests] = self.lengths[slots]
        is_done[requests] = self.is_done[slots]

    def _width(self, step: int) -> int:
        """The attention width of `step`: a bucket past the cache column of the row that has run longest."""
        offset = min(step - self._oldest, self.out_tokens.shape[1] - 2)
        return min(_round_up(self._requests[0].shape[1] + offset, self.bucket), self.k_cache.shape[3])

    # ------------------------------------------------------------------ forward

    def _prefill(self, slots: torch.Tensor, step: int) -> None:
        """Give the next waiting requests the rows `slots`: run their prompts, fill cache columns [0, S) of those
        rows, sample their first token (eager: one call per batch)."""
        first_request = self._next_request
        requests = torch.arange(first_request, first_request + len(slots), device=self.device)
        self._next_request += len(slots)
        host_slots = slots.cpu()
        self._starts[host_slots], self._checked[host_slots] = step, 0
        self._oldest = int(self._starts[: self.active].min())
        input_ids, attention_mask, keys = (t[first_request:first_request + len(slots)] for t in self._requests)
        prompt_len = input_ids.shape[1]
        is_real = attention_mask.bool()
        self.key_valid[slots, :prompt_len] = is_real
        self.key_valid[slots, prompt_len:] = True
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # A prompt's n samples share its rows: run each distinct row once and copy its K/V and logits to the
        # others (a GRPO rollout of n samples per prompt prefills n times less), in chunks of distinct prompts
        # whose activations fit in `prefill_memory`.
        first, inverse = _distinct_rows(input_ids.masked_fill(~is_real, -1))
        self.prompt_id[slots] = self._num_prompts + inverse
        self._num_prompts += len(first)
        chunk = len(first)
        if self.prefill_memory is not None:
            chunk = max(1, self.prefill_memory // self.prefill_bytes_per_prompt(prompt_len))
        logits = torch.cat([self._prefill_chunk(slots, input_ids, is_real, positions, first, inverse, start, chunk)
                            for start in range(0, len(first), chunk)])[inverse]
        self.position[slots] = positions[:, -1] + 1
        self.column[slots] = prompt_len
        self.row_map[slots], self.row_keys[slots] = requests, keys
        # The first token: the draw's step is the output column, 0.
        tokens, logprobs = self.sampler(logits, keys, 0)
        is_stop = (tokens[:, None] == self.stop_ids).any(dim=-1)
        max_tokens = self.out_tokens.shape[1] - 1
        self.out_tokens[slots] = self.pad_token
        self.out_logprobs[slots] = 0.0
        self.out_tokens[slots, 0], self.out_logprobs[slots, 0] = tokens, logprobs
        self.lengths[slots] = torch.where(is_stop, 1, max_tokens)
        self.is_done[slots] = is_stop
        self.feed[slots] = tokens
        self.out_column[slots] = 1
        self._share_prompts()

    def _share_prompts(self) -> None:
        """Point every active slot at the first active slot holding its prompt (`prompt_row`, in place: captured
        graphs read it). Slots of one prompt id hold the same prompt K/V bytes (one prefill wrote them), which
        nothing overwrites while the slot keeps the id: a decode step writes past the prompt, and a refill gives
        the slot a new id."""
        rows = self.active
        ids = self.prompt_id[:rows]
        first = torch.full((self._num_prompts,), rows, dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, ids, torch.arange(rows, device=self.device), reduce="amin")
        self.prompt_row[:rows] = first[ids]

    def _prefill_chunk(self, slots, input_ids, is_real, positions, first, inverse, start: int, chunk: int):
        """Run distinct prompts first[start:start + chunk], write their K/V to every slot that holds one of them,
        and return their last position's logits [chunk, V]."""
        prompt_len = input_ids.shape[1]
        part = first[start:start + chunk]
        mine = ((inverse >= start) & (inverse < start + len(part))).nonzero().flatten()  # the slots' positions
        targets, sources = slots[mine], inverse[mine] - start
        ids, is_real_first, positions_first = input_ids[part], is_real[part], positions[part]
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=self.device).tril()
        # Padding queries see only themselves (a fully masked row would be NaN); their outputs are unused.
        mask = (causal & is_real_first[:, None, None, :]) | torch.eye(prompt_len, dtype=torch.bool, device=self.device)
        cos, sin = self.cos_table[positions_first][:, None], self.sin_table[positions_first][:, None]  # [U, 1, S, D]
        hidden = self.body.embed_tokens(ids)
        for index, (layer, fused) in enumerate(zip(self.body.layers, self._fused)):
            q, k, v = _layer_in(layer, hidden, cos, sin, self.head_dim, fused)
            self.k_cache[index, targets, :, :prompt_len] = k[sources]
            self.v_cache[index, targets, :, :prompt_len] = v[sources]
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_scaling(layer, self.head_dim))
            hidden = _layer_out(layer, hidden, attn.transpose(1, 2).reshape(len(part), prompt_len, -1), fused)
        return self.model.lm_head(self.body.norm(hidden[:, -1]))

    def _step(self, width: int) -> None:
        """One token for the active rows: the capturable unit. Reads and advances only buffers (the first
        `active` slots of each: after compaction the running rows sit there)."""
        rows = self.active
        running = self._running()[:rows]  # the others write only where nothing reads it, and stay where they are
        position, column = self.position[:rows], self.column[:rows]
        cos_rows, sin_rows = self.cos_table[position], self.sin_table[position]  # [b, D]
        cos, sin = cos_rows[:, None, None], sin_rows[:, None, None]  # [b, 1, 1, D]
        visible = self.key_valid[:rows, :width] & (self.columns[:width] <= column[:, None])  # [b, W]
        hidden = self.body.embed_tokens(self.feed[:rows, None])  # [b, 1, H]
        at = None  # where the compiled path writes K/V; the RoPE kernel finds the columns itself
        for index, (layer, fused) in enumerate(zip(self.body.layers, self._fused)):
            k_cache, v_cache = self.k_cache[index, :rows], self.v_cache[index, :rows]
            if self._rope_cache is not None and _plain_qkv(layer, fused):
                qkv = self._layer_proj(layer, hidden, fused)
                q = self._rope_cache(qkv.view(rows, -1), cos_rows, sin_rows, k_cache, v_cache, column, self.num_heads)
            else:
                if at is None:  # a layer's cache seen as [b * H_kv * L, D]: row r, head h at column[r]
                    heads = torch.arange(rows * self.num_kv_heads, device=self.device).view(rows, self.num_kv_heads)
                    at = (heads * self.k_cache.shape[3] + column[:, None]).flatten()
                q = self._layer_in(layer, hidden, cos, sin, self.head_dim, fused, k_cache.view(-1, self.head_dim),
                                   v_cache.view(-1, self.head_dim), at)
            keys, values = k_cache[:, :, :width], v_cache[:, :, :width]  # [b, H_kv, W, D]
            # Grouped-query attention without expanding K/V: query heads j*G .. j*G+G-1 share K/V head j.
            q = q.view(rows, self.num_kv_heads, self.groups, self.head_dim)
            scale = _scaling(layer, self.head_dim)
            # The kernel reads each row's cache only up to its column, not to the end of the width's bucket, and
            # a prompt's columns from the one row of its samples that `prompt_row` names.
            attn = self._attend(q, keys, values, visible, scale, last_column=column,
                                prompt_row=self.prompt_row[:rows], prompt_columns=self.prompt_columns)  # [b, Hkv, G, D]
            hidden = self._layer_out(layer, hidden, attn.reshape(rows, 1, -1), fused)
        logits = self.model.lm_head(self.body.norm(hidden[:, 0]))
        position.add_(running)
        column.add_(running)
        self._sample_and_advance(logits, running)

    def _sample_and_advance(self, logits: torch.Tensor, running: torch.Tensor) -> None:
        """Sample from logits [b, V] (the active rows), record token and logprob at each running row's
        `out_column`, apply stop tokens."""
        rows, max_tokens = self.active, self.out_tokens.shape[1] - 1
        is_done, lengths, out_column = self.is_done[:rows], self.lengths[:rows], self.out_column[:rows]
        # The draw's step is the row's output column: a device counter, so a captured graph reads its current value.
        tokens, logprobs = self.sampler(logits, self.row_keys[:rows], out_column)
        at = torch.where(running, out_column, max_tokens)[:, None]  # rows that no longer run: the spare column,
        self.out_tokens[:rows].scatter_(1, at, tokens[:, None])  # which nothing reads
        self.out_logprobs[:rows].scatter_(1, at, logprobs[:, None])
        # A broadcast compare, not torch.isin: isin switches to a sort-based path for many ids, which a CUDA
        # graph cannot capture.
        is_stop = (tokens[:, None] == self.stop_ids).any(dim=-1) & running
        lengths.copy_(torch.where(is_stop, out_column + 1, lengths))
        is_done.logical_or_(is_stop)
        self.feed[:rows].copy_(tokens)
        out_column.add_(running)

    def _compact(self, num_running: int) -> bool:
        """Move the running rows to the front and halve the active rows while they still hold them all (never
        below `min_rows`): finished rows stop costing decode work. Returns whether anything moved."""
        rows = self.active
        if self.min_rows is None:
            return False
        target = rows
        while target // 2 >= max(num_running, self.min_rows, 1):
            target //= 2
        if target == rows:
            return False
        running = self._running()[:rows]
        order = torch.cat([running.nonzero().flatten(), (~running).nonzero().flatten()])  # running first
        # The row keys move too: a row keeps drawing its own random numbers wherever it sits.
        for buffer in (self.feed, self.position, self.column, self.out_column, self.key_valid, self.out_tokens,
                       self.out_logprobs, self.lengths, self.is_done, self.row_map, self.row_keys, self.prompt_id):
            buffer[:rows] = buffer[:rows][order]
        for index in range(self.k_cache.shape[0]):  # one layer at a time: a small temporary
            self.k_cache[index, :rows] = self.k_cache[index, :rows][order]
            self.v_cache[index, :rows] = self.v_cache[index, :rows][order]
        host_order = order.cpu()
        self._starts[:rows], self._checked[:rows] = self._starts[:rows][host_order], self._checked[:rows][host_order]
        self.active = target
        self._oldest = int(self._starts[:target].min())
        self._share_prompts()
        return True

    # ------------------------------------------------------------------ graphs and stop strings

    def _graph(self, width: int) -> torch.cuda.CUDAGraph:
        """The step's graph for the active rows at `width`, captured at its first use (kept for later calls)."""
        if (self.active, width) not in self._graphs:
            self._capture(width)
        return self._graphs[self.active, width]

    def _capture(self, width: int) -> None:
        """Capture a step graph for the active rows at `width`. What the warm-up run touches (the step's
        buffers, one cache column of the active rows) is restored after, so this can run mid-generation."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        rows = self.active
        saved = {name: getattr(self, name).clone() for name in _STEP_STATE}
        saved_cache = [cache[:, :rows, :, width - 1].clone() for cache in (self.k_cache, self.v_cache)]
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the capture (cuBLAS workspaces, lazy inits)
            self._point_at(width)
            self._step(width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._point_at(width)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(width)
        self._graphs[rows, width] = graph
        for name, value in saved.items():
            getattr(self, name).copy_(value)
        for cache, value in zip((self.k_cache, self.v_cache), saved_cache):
            cache[:, :rows, :, width - 1] = value
        end.record()
        torch.cuda.synchronize(self.device)
        self.last_capture_seconds += begin.elapsed_time(end) / 1000

    def _point_at(self, width: int) -> None:
        """Safe inputs for a warm-up step at `width`: positions in range, the last column of the width."""
        self.position.zero_()
        self.column.fill_(width - 1)
        self.out_column.zero_()

    def _check_stop_strings(self, stop_checker) -> None:
        """Host check of stop strings over each row's output columns since its last check (a row ends at its
        first hit, also when a stop token on the GPU ended it later in the same stretch)."""
        out_columns = self.out_column.cpu().tolist()
        checked = self._checked.tolist()
        rows = [row for row, (start, end) in enumerate(zip(checked, out_columns)) if end > start]
        if not rows:
            return
        tokens, lengths = self.out_tokens.cpu(), self.lengths.cpu().tolist()
        is_done = self.is_done.cpu().tolist()
        for row in rows:
            ids = tokens[row, : out_columns[row]].tolist()
            end = min(out_columns[row], lengths[row]) if is_done[row] else out_columns[row]  # a stop token's end
            for column in range(checked[row], end):
                if stop_checker.ends_in_stop(ids[: column + 1]):
                    lengths[row], is_done[row] = column + 1, True
                    break
        self._checked = torch.tensor(out_columns)
        self.is_done.copy_(torch.tensor(is_done))
        self.lengths.copy_(torch.tensor(lengths))


@inference_mode
def compile_kernels(model_config, dtype: torch.dtype, device: torch.device, params: SamplingParams, rows: int,
                    max_len: int, bucket: int = 128, min_rows: int | None = 32) -> list[str]:
    """Launch, on scratch buffers laid out as a `StaticDecoder`'s, each Triton kernel its calls would launch for a
    model of `model_config` (a config with its heads, K/V heads, head dimension and vocabulary) in `dtype`, a first
    call of `rows` rows sampled with `params` and sequences of up to `max_len` tokens: the sampler's pass over the
    logits; RoPE with the cache writes; the attention at every width bucket up to `max_len`, for the rows and each
    row count compaction halves them to (down to `min_rows`), which decide its split count. Triton compiles a kernel
    for each new specialization at its first launch and keeps it in its on-disk cache, with the C launcher it builds
    for it (~2.5 s at the 1.5B shape on an H200); a process that runs this first (`winnow.compile_ahead`'s kernels
    helper) leaves decoders launched after it only the cache to read. What decides a specialization is as the
    decoder has it: dtypes, strides (the cache length a multiple of `bucket`), per-row columns and prompt rows,
    splits. Returns the kernels launched: none off a GPU; the sampler's alone for a head dimension the other kernels
    do not take."""
    if not kernels.available(device):
        return []
    launched = []
    sampler = Sampler.of(params, fused=True)
    keys = torch.arange(rows, device=device)
    if not (sampler.is_greedy or sampler.is_truncating):  # the untruncated draw's pass over the logits
        logits = torch.zeros(rows, model_config.vocab_size, dtype=dtype, device=device)
        sampler(logits, keys, 0)  # the prefill's first token
        sampler(logits, keys, torch.zeros(rows, dtype=torch.long, device=device))  # a decode step's
        launched.append("chunk_mass")
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    if not kernels.supports_head_dim(head_dim):
        return launched
    cache_len = _round_up(max_len, bucket)
    cache = torch.zeros(rows, kv_heads, cache_len, head_dim, dtype=dtype, device=device)  # a layer's K (and V)
    column = torch.zeros(rows, dtype=torch.long, device=device)
    cos = torch.ones(rows, head_dim, dtype=dtype, device=device)
    qkv = torch.zeros(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = kernels.rope_and_cache(qkv, cos, torch.zeros_like(cos), cache, cache, column, heads)
    q = q.view(rows, kv_heads, heads // kv_heads, head_dim)
    active = rows
    while True:
        for width in range(bucket, cache_len + 1, bucket):
            kernels.decode_attention(q[:active], cache[:active, :, :width], cache[:active, :, :width],
                                     torch.ones(active, width, dtype=torch.bool, device=device), head_dim ** -0.5,
                                     last_column=column[:active], prompt_row=torch.arange(active, device=device),
                                     prompt_columns=torch.ones(1, dtype=torch.long, device=device))
        if min_rows is None or active // 2 < max(min_rows, 1):  # as `_compact` halves the active rows
            break
        active //= 2
    torch.cuda.synchronize(device)
    return launched + ["rope_cache", "attend"]


class _Fused(NamedTuple):
    """A layer's projections that read the same input, as one weight each (None: the layer's own modules)."""
    qkv_weight: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    qkv_sizes: tuple[int, ...] = ()
    gate_up_weight: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None


def _fuse_layer(layer) -> _Fused:
    """q/k/v and gate/up of `layer` fused where they are plain `nn.Linear`s of one dtype and device (adapters or
    quantized layers keep their own modules)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up = _fuse_linears([mlp.gate_proj, mlp.up_proj]) if hasattr(mlp, "act_fn") else None
    sizes = tuple(linear.weight.shape[0] for linear in (attn.q_proj, attn.k_proj, attn.v_proj))
    return _Fused(*(qkv or (None, None)), sizes if qkv else (), *(gate_up or (None, None)))


def _fuse_linears(linears: list) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight [sum of N, K] (and bias) for `linears`, or None when they cannot share one. Each linear's
    parameters become views into it: a weight sync, which copies into the parameters in place, writes the fused
    weight too, and no memory is spent twice."""
    weights = [getattr(linear, "weight", None) for linear in linears]
    if not all(type(linear) is torch.nn.Linear for linear in linears) or len(
            {(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None
        if any(linear.bias is not None for linear in linears):
            bias = torch.cat([linear.bias.detach() if linear.bias is not None else w.new_zeros(w.shape[0])
                              for linear, w in zip(linears, weights)])
    start = 0
    for linear, w in zip(linears, weights):
        end = start + w.shape[0]
        linear.weight.data = weight[start:end]
        if linear.bias is not None:
            linear.bias.data = bias[start:end]
        start = end
    return weight, bias


def _fuse_intact(layer, fused: _Fused) -> bool:
    """Whether the layer's fused projections still read their parameters' storage."""
    pairs = []
    if fused.qkv_weight is not None:
        attn = layer.self_attn
        pairs += [(linear, fused.qkv_weight, fused.qkv_bias) for linear in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if fused.gate_up_weight is not None:
        mlp = layer.mlp
        pairs += [(linear, fused.gate_up_weight, fused.gate_up_bias) for linear in (mlp.gate_proj, mlp.up_proj)]
    return all(_same_storage(linear.weight, weight) and (linear.bias is None or _same_storage(linear.bias, bias))
               for linear, weight, bias in pairs)


def _same_storage(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, fused: _Fused = _Fused()):
    """Projected, normed (Qwen3) and rotated q [B, H, S, D], k and v [B, H_kv, S, D]."""
    attn = layer.self_attn
    if fused.qkv_weight is not None:
        q, k, v = F.linear(x, fused.qkv_weight, fused.qkv_bias).split(fused.qkv_sizes, dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.unflatten(-1, (-1, head_dim))
    k = k.unflatten(-1, (-1, head_dim))
    v = v.unflatten(-1, (-1, head_dim))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float,
            last_column: torch.Tensor | None = None, prompt_row: torch.Tensor | None = None,
            prompt_columns: torch.Tensor | None = None):
    """Grouped-query attention of one decode token: q [b, H_kv, G, D] over keys/values [b, H_kv, W, D], where
    visible [b, W] says which cache columns a row may read. Scores and softmax in float32. `last_column`,
    `prompt_row` and `prompt_columns` are the kernel's arguments, unused here: `visible` already leaves out the
    columns past the last, and each row's own prompt columns hold what its prompt row's do."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)


def _layer_in(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
              fused: _Fused = _Fused()):
    """A layer's work before attention: input norm, q/k/v, RoPE."""
    return _qkv(layer, layer.input_layernorm(hidden), cos, sin, head_dim, fused)


def _layer_in_cached(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                     fused: _Fused, k_cache: torch.Tensor, v_cache: torch.Tensor, at: torch.Tensor):
    """`_layer_in` for one decode token that writes its k and v into rows `at` ([b * H_kv] long, in (row, head)
    order) of a layer's cache seen as [b * H_kv * L, D], and returns q [b, H, 1, D]. Compiled, the writes fuse
    into the RoPE kernel: inductor keeps an `index_copy_` into a flat input in place (a scatter, or a write into
    a view made inside the function, would copy the whole cache every token)."""
    q, k, v = _layer_in(layer, hidden, cos, sin, head_dim, fused)
    k_cache.index_copy_(0, at, k.reshape(-1, head_dim))
    v_cache.index_copy_(0, at, v.reshape(-1, head_dim))
    return q


def _plain_qkv(layer, fused: _Fused) -> bool:
    """Whether the layer's q/k/v are one fused projection that RoPE follows directly (no q/k norms)."""
    return fused.qkv_weight is not None and not hasattr(layer.self_attn, "q_norm")


def _layer_in_projected(layer, hidden: torch.Tensor, fused: _Fused) -> torch.Tensor:
    """A layer's input norm and fused q/k/v projection, [b, 1, (H + 2 H_kv) D], for `kernels.rope_and_cache`."""
    return F.linear(layer.input_layernorm(hidden), fused.qkv_weight, fused.qkv_bias)


def _layer_out(layer, hidden: torch.Tensor, attn: torch.Tensor, fused: _Fused = _Fused()) -> torch.Tensor:
    """A layer's work after attention: output projection, residual, MLP, residual."""
    hidden = hidden + layer.self_attn.o_proj(attn)
    x = layer.post_attention_layernorm(hidden)
    if fused.gate_up_weight is None:
        return hidden + layer.mlp(x)
    mlp = layer.mlp  # the Llama-family gated MLP: down(act(gate(x)) * up(x))
    gate, up = F.linear(x, fused.gate_up_weight, fused.gate_up_bias).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def _distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse) for rows [B, S]: each distinct row's first index [U], in order of first occurrence, and
    for every row the position of its distinct row in `first` [B], so rows == rows[first][inverse]."""
    _, classes = torch.unique(rows, dim=0, return_inverse=True)  # class ids in the order of sorted rows
    batch, num_classes = rows.shape[0], int(classes.max()) + 1
    first_of_class = torch.full((num_classes,), batch, dtype=torch.long, device=rows.device)
    first_of_class.scatter_reduce_(0, classes, torch.arange(batch, device=rows.device), reduce="amin")
    order = torch.argsort(first_of_class)
    position = torch.empty_like(order)
    position[order] = torch.arange(num_classes, device=rows.device)
    return first_of_class[order], position[classes]


def _scaling(layer, head_dim: int) -> float:
    return getattr(layer.self_attn, "scaling", None) or head_dim**-0.5


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
