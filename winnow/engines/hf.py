"""`hf`: the embedded engine, on plain PyTorch + transformers.

It runs its own decode loop over a `transformers` causal LM instead of calling `model.generate`, so that
it returns exactly what RL needs (the log-probability of every sampled token, under the same distribution
the learner recomputes) and so that sampling is reproducible from a seed:

    prompts ─► left-pad ─► prefill (one forward) ─► decode loop: sample, record logprob, stop checks
                                                     └─ one forward per new token on the KV cache

Two decode paths, chosen by `HFEngineConfig.decode`:
- `graph` (the GPU default for Llama-family models: Llama, Qwen2/2.5/3, Mistral): winnow's own
  fixed-shape step over preallocated buffers (`static_decode.StaticDecoder`), captured as CUDA graphs and
  replayed with no host work per token; grouped-query attention over length buckets of the cache;
  sync-free sampling. `static` is the same step run eagerly (CPU, debugging).
- `hf` (the default elsewhere, any causal LM): the transformers forward, one call per token, with a
  static (GPU) or dynamic (CPU) `transformers` KV cache.
Both call the same sampler (`sampling.Sampler`): an inverse-CDF draw from softmax(logits / T) whose random
number depends only on (the prompt's seed, the sample's index among the prompt's n, the decode step), so one
seed gives the same responses on both paths, however the prompts are batched or split across calls.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Iterable, TYPE_CHECKING

from winnow import compile_ahead
from winnow.lazy import inference_mode, lazy_import, no_grad
from winnow.engines.sampling import Sampler, prompt_seeds, row_keys
from winnow.engines.static_decode import StaticDecoder, unsupported_reason
from winnow.types import Completion, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
torch = lazy_import("torch")
transformers = lazy_import("transformers")


@dataclass
class HFEngineConfig:
    """Settings of the embedded `hf` engine."""

    max_batch_size: int = 0
    """the most sequences (prompts x samples) decoded together; the rest of a larger call wait for a free slot
    (`refill`) or run in chunks of equal size after them.
    0 (auto): with the graph/static decoder on a GPU, as many as fit in `kv_cache_memory` (a whole GRPO rollout
    at once, where it fits: chunks of 256 made 512 rows ~1.3x slower to generate); elsewhere 256"""
    kv_cache_memory: float = 0.3
    """with max_batch_size 0 on a GPU: the share of the GPU's free memory (at each call) that the decode
    buffers (KV cache, logits, an eighth for the prefill's activations) may take; they stay allocated while the
    learner trains unless free_cache_on_sleep"""
    kv_cache: str = "auto"
    """"static" (preallocated, GPU default), "dynamic" (grows per step, CPU default) or "auto\""""
    dtype: str = "auto"
    """engine weights: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float16" or "float32\""""
    seed: int = 0
    """seeds the engine's own generator, which draws a seed for every call whose SamplingParams has neither
    seed nor prompt_seeds"""
    decode: str = "auto"
    """decode loop: "graph" (CUDA graphs over winnow's fixed-shape step), "static" (the same step, eager),
    "hf" (the transformers forward per token) or "auto" (graph on GPU for Llama-family models, else hf)"""
    attention_bucket: int = 128
    """graph/static decode attends over the cache in buckets of this many columns (one graph per bucket)"""
    compile_decode: bool = False
    """graph/static decode: torch.compile the per-layer work around attention (fewer, fused kernels per
    token; a one-off compile of tens of seconds at the first generate)"""
    refill: bool = True
    """graph/static decode, a call with more sequences than decode together (max_batch_size): the waiting ones
    take the slots of finished rows as they free up (checked every 16 tokens), so a long response holds one slot,
    not a whole batch of finished ones. False: they run in chunks one after the other, each as long as its longest
    response"""
    min_active_rows: int = 32
    """graph/static decode: once at most half the rows still run (checked every 16 tokens), they move to the
    front and decode continues on half as many rows, never fewer than this; 0 turns compaction off"""
    free_cache_on_sleep: bool = False
    """graph/static decode: free the KV cache and graphs on sleep() (memory for the learner) at the cost of
    rebuilding them, and recapturing the graphs, at the next generate"""


_DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes
PREFILL_SHARE = 0.125
"""with max_batch_size 0: the share of the decode memory budget kept for the prefill's activations"""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(_DTYPES)}")
    return getattr(torch, name)


class HFEngine:
    """Batched sampling with per-token logprobs on a `transformers` causal LM.

    The engine owns its own copy of the policy (the learner trains another), so weight sync is an
    explicit, timed `update_weights` call, as it is with any other backend.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: HFEngineConfig | None = None,
        device: torch.device | str | None = None,
        copy_model: bool = True,
    ):
        self.config = config or HFEngineConfig()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        model = copy.deepcopy(model) if copy_model else model
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.generator = torch.Generator().manual_seed(self.config.seed)  # host: one draw per unseeded call
        self.last_sync_seconds = 0.0
        self._sync_start: float | None = None  # set while a bucketed sync is under way
        self._synced: set[str] = set()
        kv_cache = self.config.kv_cache
        if kv_cache == "auto":
            kv_cache = "static" if self.device.type == "cuda" else "dynamic"
        if kv_cache not in ("static", "dynamic"):
            raise ValueError(f"kv_cache={self.config.kv_cache!r}: use 'auto', 'static' or 'dynamic'")
        self.kv_cache = kv_cache
        if self.config.max_batch_size < 0:
            raise ValueError(f"max_batch_size={self.config.max_batch_size}: use a positive number of sequences, or 0 "
                             "for auto (--engine.max-batch-size)")
        if not 0 < self.config.kv_cache_memory <= 1:
            raise ValueError(f"kv_cache_memory={self.config.kv_cache_memory}: use a share of the GPU's free memory "
                             "in (0, 1] (--engine.kv-cache-memory)")
        self.decoder = self._make_decoder()
        self._logged_limit = 0

    # ------------------------------------------------------------------ public API

    @inference_mode
    @compile_ahead.gate("engine")  # a compiling run's first calls wait for its helper's compile (`compile_ahead`)
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample `params.n` responses per prompt; completions[i*n:(i+1)*n] answer prompts[i].

        Sample j of prompt i draws from (prompt_seeds[i], j) alone (`sampling`), so a prompt's responses are
        the same whether it is generated alone, with others, or in another chunk.
        """
        params.validate()
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        keys = row_keys(prompt_seeds(params, len(prompts), self.generator), params.n, self.device)  # [P*n]
        expanded = [ids for ids in prompts for _ in range(params.n)]
        max_len = max(len(ids) for ids in prompts) + params.max_tokens
        if self.decoder is not None and self.config.refill:
            rows = self._row_limit(len(expanded), max_len)
            return self._decode_static(expanded, params, keys, max_rows=rows)
        chunk = self._chunk_size(len(expanded), max_len)
        out: list[Completion] = []
        for start in range(0, len(expanded), chunk):
            out.extend(self._generate_chunk(expanded[start:start + chunk], params, keys[start:start + chunk]))
        return out

    def _row_limit(self, num_sequences: int, max_len: int) -> int:
        """The most sequences decoded together: `max_batch_size`, or with 0 (auto) what fits with the graph/static
        decoder on a GPU (`_rows_that_fit`), else 256. Says once when a call is larger."""
        limit = self.config.max_batch_size
        is_sized = limit == 0 and self.decoder is not None and self.device.type == "cuda"
        if limit == 0:
            limit = self._rows_that_fit(max_len) if is_sized else 256
        if is_sized and num_sequences > limit and limit != self._logged_limit:  # slower than one batch: say why
            log.info("engine: %d sequences, at most %d at a time (what fits in --engine.kv-cache-memory %.2f of the "
                     "GPU's free memory)", num_sequences, limit, self.config.kv_cache_memory)
            self._logged_limit = limit
        return limit

    def _chunk_size(self, num_sequences: int, max_len: int) -> int:
        """Sequences per decode batch without refill: at most `_row_limit`, in chunks of equal size, so the static
        decoder's buffers and graphs made for the first serve them all."""
        num_chunks = -(-num_sequences // self._row_limit(num_sequences, max_len))
        return -(-num_sequences // num_chunks)

    def _rows_that_fit(self, max_len: int) -> int:
        """How many rows' decode buffers fit in `kv_cache_memory` of the GPU's free memory (the decoder's
        current buffers count as free: a new shape replaces them), an eighth of it kept for the prefill's
        activations (the decoder prefills in chunks of distinct prompts that fit there)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = self.config.kv_cache_memory * free + self.decoder.buffer_bytes()
        self.decoder.prefill_memory = int(budget * PREFILL_SHARE)
        return max(1, int(budget * (1 - PREFILL_SHARE) // self.decoder.bytes_per_row(max_len)))

    @no_grad
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_last_bucket: bool = True) -> None:
        """Copy the learner's weights in place (names as in `model.named_parameters()`).

        A sync may come in several calls (buckets): every call but the last passes `is_last_bucket=False`,
        and the last one checks that the calls together wrote every parameter, so a sync that missed one
        fails loudly instead of leaving it stale. One call with all weights is a whole sync.
        """
        if self._sync_start is None:
            self._sync_start, self._synced = time.perf_counter(), set()
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                self._sync_start = None
                raise KeyError(f"update_weights got {name!r}, which the engine's model has no parameter for")
            params[name].copy_(tensor.detach())
            self._synced.add(name)
        if not is_last_bucket:
            return
        start, self._sync_start = self._sync_start, None
        if missing := set(params) - self._synced:
            raise KeyError(f"update_weights left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_sync_seconds = time.perf_counter() - start

    def sleep(self) -> None:
        """With `free_cache_on_sleep`, free the graph/static decoder's KV cache and graphs; else nothing."""
        if self.decoder is not None and self.config.free_cache_on_sleep:
            self.decoder.release()

    def wake(self) -> None:
        """Nothing to do: the decoder rebuilds what `sleep` freed at the next generate."""

    def _make_decoder(self) -> StaticDecoder | None:
        mode = self.config.decode
        if mode not in ("auto", "graph", "static", "hf"):
            raise ValueError(f"decode={mode!r}: use 'auto', 'graph', 'static' or 'hf'")
        reason = unsupported_reason(self.model)
        if mode == "auto":
            mode = "graph" if self.device.type == "cuda" and reason is None else "hf"
        if mode == "hf":
            return None
        if reason is not None:
            raise ValueError(f"decode={mode!r} cannot run this model: {reason}; use decode='hf'")
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError("decode='graph' needs a CUDA device; use decode='static' (eager) on CPU")
        return StaticDecoder(self.model, use_graphs=mode == "graph", bucket=self.config.attention_bucket,
                             compile=self.config.compile_decode, min_rows=self.config.min_active_rows or None)

    # ------------------------------------------------------------------ decoding

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, keys: torch.Tensor) -> list[Completion]:
        """Responses to `prompts` (one row each, keys [B] int64 their sampling keys)."""
        if self.decoder is not None:
            return self._decode_static(prompts, params, keys)
        batch_size = len(prompts)
        input_ids, attention_mask = self._left_pad(prompts)
        prompt_len = input_ids.shape[1]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache(batch_size, prompt_len + params.max_tokens)

        stop_ids = torch.tensor(
            list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids), device=self.device
        )
        tokens = torch.empty((batch_size, params.max_tokens), dtype=torch.long, device=self.device)
        logprobs = torch.zeros((batch_size, params.max_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.full((batch_size,), params.max_tokens, dtype=torch.long, device=self.device)
        is_done = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        stop_checker = _StopStrings(self.tokenizer, params.stop) if params.stop else None
        sampler = Sampler.of(params)

        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        for step in range(params.max_tokens):
            next_tokens, next_logprobs = sampler(logits, keys, step)
            next_tokens = torch.where(is_done, self.pad_token_id, next_tokens)
            tokens[:, step], logprobs[:, step] = next_tokens, next_logprobs.masked_fill(is_done, 0.0)
            is_stop = torch.isin(next_tokens, stop_ids) & ~is_done
            if stop_checker is not None:
                is_stop |= stop_checker.update(tokens[:, : step + 1], is_done | is_stop)
            lengths = torch.where(is_stop, step + 1, lengths)
            is_done |= is_stop
            if step + 1 == params.max_tokens or bool(is_done.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            logits = self._forward(next_tokens[:, None], attention_mask, position_ids, cache)
        return self._completions(prompts, tokens.cpu(), logprobs.cpu(), lengths.cpu(), is_done.cpu(), params)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, S] on the device. Left padding puts every prompt's last token in the
        last column, so one decode step serves all rows."""
        batch_size, prompt_len = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch_size, prompt_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, prompt_len), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, prompt_len - len(ids) :] = torch.tensor(ids)
            attention_mask[row, prompt_len - len(ids) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _decode_static(self, prompts, params, keys, max_rows: int | None = None) -> list[Completion]:
        """Responses to `prompts` from the graph/static decoder, at most `max_rows` decoding together."""
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
        stop_checker = _StopStrings(self.tokenizer, params.stop) if params.stop else None
        input_ids, attention_mask = self._left_pad(prompts)
        tokens, logprobs, lengths, is_done = self.decoder.generate(
            input_ids, attention_mask, params, stop_ids=stop_ids, pad_token_id=self.pad_token_id, row_keys=keys,
            stop_checker=stop_checker, max_rows=max_rows,
        )
        return self._completions(prompts, tokens.cpu(), logprobs.cpu(), lengths.cpu(), is_done.cpu(), params)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Logits of the last position, float32, [B, V]."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _new_cache(self, batch_size: int, max_len: int):
        if self.kv_cache == "static":
            return transformers.StaticCache(config=self.model.config, max_cache_len=max_len)
        return transformers.DynamicCache(config=self.model.config)

    def _completions(self, prompts, tokens, logprobs, lengths, is_done, params) -> list[Completion]:
        """Row i of the decode batch as the completion of prompts[i]: tokens, logprobs [B, max_tokens] and
        lengths, is_done [B], on the host. The rows leave through numpy (~1 us a row, against ~5 us for a torch
        slice; only a response's own tokens become Python numbers, never the padding after it) and the texts are
        decoded in one call (`_decode_rows`): 512 rows of 512 tokens took ~60 ms that way on the GPU machine's
        host, against ~105 ms row by row (`benchmarks/host_overhead.py`)."""
        lengths, is_done = lengths.tolist(), is_done.tolist()  # [B] ints, [B] bools
        response_ids = [row[:n].tolist() for row, n in zip(tokens.numpy(), lengths)]
        response_logprobs = [row[:n].tolist() for row, n in zip(logprobs.numpy(), lengths)]  # float32 widened
        texts = _decode_rows(self.tokenizer, response_ids)
        out = []
        for prompt_ids, ids, row_logprobs, text, is_stopped in zip(
            prompts, response_ids, response_logprobs, texts, is_done
        ):
            for stop in params.stop:
                if (cut := text.find(stop)) >= 0:
                    text = text[:cut]
            out.append(
                Completion(
                    prompt_ids=list(prompt_ids),
                    response_ids=ids,
                    logprobs=row_logprobs,
                    finish_reason="stop" if is_stopped else "length",
                    text=text,
                )
            )
        return out


class _StopStrings:
    """Finds rows whose decoded text now contains a stop string (decoding only the rows still running)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tail = max(len(s) for s in stops) + 8  # tokens to decode: enough to hold any stop string

    def update(self, tokens: torch.Tensor, is_done: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows not done whose tokens [B, T] now end in text holding a stop string."""
        hit = torch.zeros_like(is_done)
        for row in (~is_done).nonzero().flatten().tolist():
            hit[row] = self.ends_in_stop(tokens[row].tolist())
        return hit

    def ends_in_stop(self, ids: list[int]) -> bool:
        """Whether the text of the last tokens of `ids` holds a stop string."""
        text = self.tokenizer.decode(ids[-self.tail :], skip_special_tokens=True)
        return any(stop in text for stop in self.stops)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("neither the model's generation_config nor the tokenizer names an EOS token")
    return [ids] if isinstance(ids, int) else list(ids)


def _decode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[list[int]]) -> list[str]:
    """`tokenizer.decode(row, skip_special_tokens=True)` for every row. A fast (Rust) tokenizer whose `decode`
    transformers hands to the Rust tokenizer unchanged (neither method overridden, no space clean-up) decodes
    the whole batch in one call, spread over threads; `decode` per row also checks every id's type in Python
    first. Any other tokenizer decodes row by row."""
    fast = transformers.PreTrainedTokenizerFast
    is_plain_fast = (isinstance(tokenizer, fast) and type(tokenizer).decode is fast.decode
                     and type(tokenizer)._decode is fast._decode and not tokenizer.clean_up_tokenization_spaces)
    if is_plain_fast:
        return tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
