"""Per-token log-probabilities of a TrainBatch under a model: the quantity every loss in winnow starts from."""
from __future__ import annotations

import functools

from winnow.lazy import lazy_import
from winnow.learner.shared_prompts import SharedLayout, shared_layout
from winnow.types import TrainBatch

torch = lazy_import("torch")


def selective_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """log softmax(logits)[label] for every position, without a full-vocabulary float32 copy of `logits`.

    logits: [N, V] (any float dtype); labels: [N] long. Returns [N] float32.
    logp = logit[label] - logsumexp(logits); the logsumexp is taken in float32 a chunk of rows at a time,
    so peak extra memory is chunk_rows x V floats instead of N x V.
    """
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start : start + chunk_rows].float()
        picked = rows.gather(-1, labels[start : start + chunk_rows, None]).squeeze(-1)
        out[start : start + chunk_rows] = picked - torch.logsumexp(rows, dim=-1)
    return out


def _chunk_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """One chunk's picked log-probability and log-normaliser, float32: logits [c, V] (the head's output, any float
    dtype), labels [c] -> ([c], [c])."""
    z = logits.float() / temperature
    log_norm = torch.logsumexp(z, dim=-1)
    return z.gather(-1, labels[:, None]).squeeze(-1) - log_norm, log_norm


def _chunk_grad_logits(logits: torch.Tensor, labels: torch.Tensor, log_norm: torch.Tensor, grad_out: torch.Tensor,
                       temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """d(grad_out . logp[label]) / d logits for one chunk: (1[v = label] - softmax(z)_v) * grad_out / T, in `dtype`."""
    z = logits.float() / temperature
    scale = grad_out[:, None] / temperature
    if torch.compiler.is_compiling():  # one fused pass: the label test is an elementwise compare
        hit = torch.arange(z.shape[-1], device=z.device) == labels[:, None]
        return ((hit.to(z.dtype) - torch.exp(z - log_norm[:, None])) * scale).to(dtype)
    grad = torch.exp(z - log_norm[:, None]).mul_(-scale)  # eagerly: no [c, V] mask, a scatter of c values
    grad.scatter_add_(-1, labels[:, None], scale)
    return grad.to(dtype)


@functools.cache
def _compiled(fn, dynamic: bool):
    """`fn` compiled once per process: with symbolic shapes (`dynamic`: one compile for every chunk size), or
    for the first shape, compiling again (dynamically) at the next."""
    return torch.compile(fn, fullgraph=True, dynamic=True if dynamic else None)


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[label] a chunk of rows at a time, forward and backward.

    Neither pass ever holds more than `chunk_rows x V` logits: forward keeps only the row's log-normaliser,
    backward recomputes each chunk's logits (one extra head matmul, ~1/3 of the head's training FLOPs) and
    turns them into gradients at once: d logp / d z_v = (1[v = label] - softmax(z)_v) / T.
    Matmuls run in `compute_dtype` (bf16 under autocast) with float32 softmax statistics and a float32
    weight-gradient accumulator. With `compile`, the work between the matmuls (the float32 log-softmax and its
    gradient, ~10 elementwise kernels over every logit eagerly) runs as one compiled kernel per direction.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_rows, compute_dtype, compile, dynamic):
        stats = _compiled(_chunk_logprobs, dynamic) if compile else _chunk_logprobs
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
            log_norm = torch.empty_like(out)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                out[rows], log_norm[rows] = stats(h[rows] @ w.T, labels[rows], temperature)  # [c, V] logits
        ctx.save_for_backward(hidden, weight, labels, log_norm)
        ctx.temperature, ctx.chunk_rows, ctx.compute_dtype = temperature, chunk_rows, compute_dtype
        ctx.compile, ctx.dynamic = compile, dynamic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, log_norm = ctx.saved_tensors
        temperature, chunk_rows, dtype = ctx.temperature, ctx.chunk_rows, ctx.compute_dtype
        grad_logits_of = _compiled(_chunk_grad_logits, ctx.dynamic) if ctx.compile else _chunk_grad_logits
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty_like(h)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                grad_logits = grad_logits_of(h[rows] @ w.T, labels[rows], log_norm[rows], grad_out[rows],
                                             temperature, dtype)
                grad_hidden[rows] = grad_logits @ w
                _add_product(grad_weight, grad_logits.T, h[rows])
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None, None, None


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b for a float32 `total` and a, b in the compute dtype. Where this torch's matmul can add into
    a float32 output from bf16/fp16 inputs (`_adds_into_float32`), the matmul's epilogue does it; otherwise one
    kernel adds the product, upcast as it reads it. (The head's weight gradient is [V, H], ~0.5 GB in float32 at
    Qwen2.5-0.5B, added once per chunk of rows. A float32 copy of each product and then the add moved ~2.4 GB a
    chunk: on an H200 the 0.5B GRPO step took 2.148 s that way and 2.069 s with the epilogue's add.)"""
    if a.dtype != total.dtype and _adds_into_float32(total.device, a.dtype):
        torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    else:
        total += a @ b


@functools.cache
def _adds_into_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(c, a, b, out_dtype=float32, out=c)` runs here for a float32 `c` and a, b in `dtype`
    and gives c + a @ b (CUDA builds of recent torch; older ones want `c` in the inputs' dtype)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    a = torch.arange(12, device=device, dtype=torch.float32).view(4, 3).sub(5).div(4)
    b = torch.arange(6, device=device, dtype=torch.float32).view(3, 2).sub(2).div(2)
    total = torch.ones(4, 2, device=device)
    want = total + a @ b  # exact: the inputs are multiples of 1/4 and 1/2, representable in bf16 and fp16
    try:
        torch.addmm(total, a.to(dtype), b.to(dtype), out_dtype=torch.float32, out=total)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.equal(total, want))


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    chunk_rows: int = 2048, compile: bool = False, dynamic: bool = False,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[labels] without materialising the [N, V] logits.

    hidden: [N, H]; weight: [V, H] (the LM head); labels: [N] long. Returns [N] float32, differentiable in
    hidden and weight. Under autocast the matmuls run in the autocast dtype. `compile` fuses the log-softmax
    and its gradient into one kernel per direction (torch.compile; the first call pays the compile), for the
    first chunk size and again with symbolic shapes at the next, or (`dynamic`) with symbolic shapes at once.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    return _LinearLogprobs.apply(hidden, weight, labels, float(temperature), chunk_rows, dtype, compile, dynamic)


def can_fuse_head(model: torch.nn.Module) -> bool:
    """True when `model` is a plain (unwrapped) Llama-family causal LM whose logits are just
    `lm_head(model.model(...))`: no bias, no soft-capping or logit scaling, and no sharding wrapper whose
    root forward must run to gather parameters."""
    from winnow.engines.static_decode import SUPPORTED_MODEL_TYPES

    head = getattr(model, "lm_head", None)
    return (
        getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES
        and type(head) is torch.nn.Linear and head.bias is None
        and type(model).__module__.startswith("transformers.")
        and hasattr(model, "model")
    )


def sequence_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0, fused_head: bool = False,
    compile_head: bool = False, compile_dynamic: bool = False, share_prompts: bool = False,
) -> torch.Tensor:
    """Log-probability of each token of `batch.input_ids` given the tokens before it, [B, T] float32.

    Position t holds log p(input_ids[t] | input_ids[:t]) (0 at t=0 and off the response mask), aligned
    with `TrainBatch.response_mask`. Logits are divided by `temperature`, the sampling temperature, so the
    result is comparable with the engine's logprobs (which are taken under logits / temperature).
    Only the columns from the first response token on are projected to the vocabulary. With `fused_head`
    (and a model `can_fuse_head` accepts) the decoder runs alone and `linear_logprobs` projects its hidden
    states chunk by chunk, so no [B, T, V] logits exist in forward or backward; `compile_head` fuses each chunk's
    log-softmax and its gradient into one compiled kernel per direction (`compile_dynamic`: symbolic shapes).
    `share_prompts`: rows with the same prompt run it once (`winnow.learner.shared_prompts`; the same logprobs up to
    float rounding).
    """
    layout = shared_layout(batch) if share_prompts else None
    if layout is not None:
        return _shared_logprobs(model, batch, layout, temperature, fused_head and can_fuse_head(model),
                                compile_head, compile_dynamic)
    input_ids, mask = batch.input_ids, batch.response_mask
    # The first column any row needs a logit for: one before its first response token.
    has_response = mask.any(dim=0).nonzero()
    first = int(has_response[0]) if len(has_response) else input_ids.shape[1] - 1
    first = max(first - 1, 0)
    positions = batch.attention_mask.cumsum(-1).clamp(min=1) - 1
    attention_mask = batch.attention_mask
    if batch.position_ids is not None:
        # Packed rows: positions restart per sequence, and with no 2-D mask transformers builds the block-diagonal
        # causal mask from those restarts (masking_utils.find_packed_sequence_indices), or its varlen kernels.
        positions, attention_mask = batch.position_ids, None
    labels = input_ids[:, first + 1 :]
    if fused_head and can_fuse_head(model):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state[:, first:-1]  # [B, T - 1 - first, H]
        picked = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, labels.reshape(-1),
                                 temperature, compile=compile_head, dynamic=compile_dynamic).view(labels.shape)
        out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        out[:, first + 1 :] = picked
        return out * mask
    # Project only the needed columns (`logits_to_keep` keeps the last T - first): the prompt columns never
    # reach the vocabulary. One call of the whole model, not decoder then head, because sharded strategies
    # (FSDP2, DeepSpeed ZeRO-3) gather the root's parameters (embeddings, head) in the root's forward.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                logits_to_keep=input_ids.shape[1] - first, use_cache=False)
    logits = out.logits[:, :-1]  # [B, T - 1 - first, V]
    if temperature != 1.0:
        logits = logits / temperature
    picked = selective_logprobs(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).view(labels.shape)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, first + 1 :] = picked
    return out * mask


def _shared_logprobs(model: torch.nn.Module, batch: TrainBatch, layout: SharedLayout, temperature: float,
                     fused_head: bool, compile_head: bool, compile_dynamic: bool) -> torch.Tensor:
    """`sequence_logprobs` over the packed row of `layout`: one forward, the labels' logprobs put back in the
    batch's [B, T] places."""
    inputs = layout.model_inputs()
    if fused_head:
        hidden = model.model(**inputs).last_hidden_state[0, layout.sources]  # [N, H]
        picked = linear_logprobs(hidden, model.lm_head.weight, layout.labels, temperature, compile=compile_head,
                                 dynamic=compile_dynamic)
    else:  # the whole model's forward (sharded strategies gather in it), logits only at the sources
        logits = model(**inputs, logits_to_keep=layout.sources).logits[0]  # [N, V]
        if temperature != 1.0:
            logits = logits / temperature
        picked = selective_logprobs(logits, layout.labels)
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    out[layout.rows, layout.columns] = picked
    return out * batch.response_mask


def token_accuracy(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """1.0 where the model's most likely next token (argmax of the logits at t-1) is `input_ids[t]`, [B, T] float32,
    0 off the response mask. Packed rows (`batch.position_ids`) get per-sequence positions and attention."""
    if batch.position_ids is not None:
        positions, attention_mask = batch.position_ids, None
    else:
        positions, attention_mask = batch.attention_mask.cumsum(-1).clamp(min=1) - 1, batch.attention_mask
    logits = model(input_ids=batch.input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=False).logits  # [B, T, V]
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    out[:, 1:] = (logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]).float()
    return out * batch.response_mask
