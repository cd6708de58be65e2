"""Prompt sharing: the samples of one prompt run the prompt's tokens once in the learner's forward and backward.

A GRPO rollout holds n samples of every prompt, and a preference pair two responses to one prompt. Trained as
separate rows, each row runs the prompt through every layer again: at 128-token prompts and 512-token responses
that is 20% of the learner's work, repeated n times. Here a micro-batch becomes one packed row of segments,
every prompt once followed by the responses to it, and no padding:

    [prompt A][response A1][response A2]...[prompt B][response B1]...

A response attends to its group's prompt and, causally, to itself; a prompt attends causally to itself. Every
token gets the position it has in its own sequence, so a response's hidden states are those of its padded row,
and the first response token is predicted from the prompt's last hidden state, shared by the group. The
gradients that reach the prompt's activations are the sum over its responses, which is what the separate rows'
backward adds up in the weights: the result is the same up to the order of floating-point additions (the tests
compare both ways).

On a GPU, attention is FlashAttention's variable-length kernel (`torch.nn.attention.varlen`), one sequence per
segment: a prompt's queries over its own keys, a response's queries over its prompt's keys followed by its own
(causal aligned at the end, so response token i sees the prompt and response tokens 0..i). Elsewhere it is SDPA
with the dense [L, L] mask of the same rule (that kernel has no CPU build).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from winnow.lazy import lazy_import
from winnow.types import TrainBatch

torch = lazy_import("torch")

ATTENTION = "winnow_shared_prompts"
"""the attention implementation registered with transformers: the variable-length kernel for a packed row that
carries `SegmentAttention`, SDPA for everything else"""


@dataclass
class SegmentAttention:
    """What the variable-length kernel needs for one packed row of S segments (Tk keys in all)."""

    cu_seq_q: torch.Tensor
    """[S + 1] int32: where each segment's queries start in the packed row"""
    cu_seq_k: torch.Tensor
    """[S + 1] int32: where each segment's keys start in `key_index`"""
    key_index: torch.Tensor
    """[Tk] long: the packed token behind each key (a response's keys are its prompt's tokens, then its own)"""
    max_q: int
    """at least the longest segment (a power of two)"""
    max_k: int
    """at least the most keys of a segment (a power of two)"""


@dataclass
class SharedLayout:
    """A micro-batch packed with each prompt once. L is the packed length, N the labels (response tokens)."""

    input_ids: torch.Tensor
    """[1, L] long"""
    position_ids: torch.Tensor
    """[1, L] long: each token's position within its own sequence"""
    attention: SegmentAttention | torch.Tensor
    """the segments (GPU), or the [1, 1, L, L] bool mask (elsewhere)"""
    sources: torch.Tensor
    """[N] long: the packed position whose hidden state predicts each label"""
    labels: torch.Tensor
    """[N] long: the token each label predicts"""
    rows: torch.Tensor
    """[N] long: the label's row in the micro-batch"""
    columns: torch.Tensor
    """[N] long: the label's column in the micro-batch"""
    num_shared_tokens: int
    """prompt tokens not run again because a group shares them"""

    def model_inputs(self) -> dict:
        """Keyword arguments for the transformers forward. With segments the mask is a stride-0 placeholder (a 4-D
        mask passes transformers' mask building untouched, and `shared_attention` reads the segments instead)."""
        inputs = dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False)
        if isinstance(self.attention, SegmentAttention):
            length = self.input_ids.shape[1]
            placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.input_ids.device)
            return {**inputs, "attention_mask": placeholder.expand(1, 1, length, length), "segments": self.attention}
        return {**inputs, "attention_mask": self.attention}


def shared_layout(batch: TrainBatch) -> SharedLayout | None:
    """The packed layout of `batch` (rows right-padded, prompt = the tokens before a row's first response-mask
    token; rows with the same prompt tokens share it), or None when it does not apply: already packed rows,
    a row with left padding or with a response but no prompt token, no response token at all."""
    if batch.position_ids is not None or batch.batch_size == 0:
        return None
    lengths, prompt_lens = batch.attention_mask.sum(dim=1), prompt_lengths(batch)
    columns = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    is_contiguous = (batch.attention_mask.bool() == (columns < lengths[:, None])).all(dim=1)
    leads = _prompt_leads(batch.input_ids, prompt_lens)
    lengths, prompt_lens, leads, is_contiguous = torch.stack([lengths, prompt_lens, leads, is_contiguous]).tolist()
    if not all(is_contiguous) or any(p == 0 and n > 0 for p, n in zip(prompt_lens, lengths)):
        return None
    if all(n <= p for p, n in zip(prompt_lens, lengths)):  # nothing to label (a sharded rank's padding rows)
        return None
    segments = _segments(lengths, prompt_lens, leads)
    return _expand(batch, segments, use_kernel=available(batch.input_ids.device))


def prompt_lengths(batch: TrainBatch) -> torch.Tensor:
    """[B] long: each row's tokens before its first response-mask token (a row with no response token: all of its
    tokens, so it has nothing to label)."""
    mask = batch.response_mask > 0
    return torch.where(mask.any(dim=1), mask.int().argmax(dim=1), batch.attention_mask.sum(dim=1))


def _prompt_leads(input_ids: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """[B] long: for each row, the first row with the same prompt (tokens before prompt_lens, and the same
    prompt length); a row is its own lead when no earlier row has its prompt."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    prompts = input_ids.masked_fill(columns >= prompt_lens[:, None], -1)
    prompts = torch.cat([prompts, prompt_lens[:, None]], dim=1)
    _, classes = torch.unique(prompts, dim=0, return_inverse=True)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    first = torch.full_like(rows, input_ids.shape[0]).scatter_reduce(0, classes, rows, reduce="amin")
    return first[classes]


def _segments(lengths: list[int], prompt_lens: list[int], leads: list[int]) -> dict[str, list[int]]:
    """The packed row's segments in order (host lists, one entry a segment): each group's prompt, then its rows'
    responses. `row`, `begin`, `length`: the batch row and columns it copies; `start`: where it starts in the
    packed row; `prompt_start`, `prompt_length`: the prompt a response attends to (length 0 for a prompt)."""
    out = {name: [] for name in ("row", "begin", "length", "start", "prompt_start", "prompt_length")}
    groups: dict[int, list[int]] = {}
    for row, lead in enumerate(leads):
        if lengths[row] > prompt_lens[row]:  # a row with no response token has nothing to train
            groups.setdefault(lead, []).append(row)
    start = 0
    for lead, rows in groups.items():
        prompt_len, prompt_start = prompt_lens[lead], start
        for row, begin, end in [(lead, 0, prompt_len)] + [(r, prompt_len, lengths[r]) for r in rows]:
            is_response = begin > 0
            for name, value in zip(out, (row, begin, end - begin, start, prompt_start, prompt_len * is_response)):
                out[name].append(value)
            start += end - begin
    return out


def _expand(batch: TrainBatch, segments: dict[str, list[int]], use_kernel: bool) -> SharedLayout:
    """Token-level tensors of the packed row, built on the batch's device from the segment table."""
    device = batch.input_ids.device
    seg = {name: torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
           for name, values in segments.items()}
    length = sum(segments["length"])
    token_seg = torch.repeat_interleave(seg["length"], output_size=length)  # [L] each token's segment
    offset = torch.arange(length, device=device) - seg["start"][token_seg]
    rows, columns = seg["row"][token_seg], seg["begin"][token_seg] + offset
    input_ids = batch.input_ids[rows, columns]
    # Labels: the response tokens, each predicted by the token before it, the first by its prompt's last token.
    is_label = seg["prompt_length"][token_seg] > 0
    num_labels = sum(n for n, p in zip(segments["length"], segments["prompt_length"]) if p)
    labels = is_label.int().argsort(descending=True, stable=True)[:num_labels]  # [N] packed positions
    first_source = seg["prompt_start"] + seg["prompt_length"] - 1
    sources = torch.where(offset == 0, first_source[token_seg], torch.arange(length, device=device) - 1)[labels]
    if use_kernel:
        attention = _segment_attention(segments, seg, device)
    else:
        prompt_start = seg["prompt_start"][token_seg]
        attention = _dense_mask(prompt_start, prompt_start + seg["prompt_length"][token_seg],
                                seg["start"][token_seg])[None, None]
    # Each response would have run its prompt: all those prompt tokens less the ones each group runs once.
    shared = sum(segments["prompt_length"]) - sum(n for n, p in zip(segments["length"], segments["prompt_length"])
                                                   if not p)
    return SharedLayout(input_ids=input_ids[None], position_ids=columns[None], attention=attention, sources=sources,
                        labels=input_ids[labels], rows=rows[labels], columns=columns[labels],
                        num_shared_tokens=shared)


def _segment_attention(segments: dict[str, list[int]], seg: dict, device) -> SegmentAttention:
    """Each segment's keys for the variable-length kernel: a prompt's own tokens; a response's prompt, then its
    own tokens."""
    num_keys = [n + p for n, p in zip(segments["length"], segments["prompt_length"])]
    cu_q = torch.tensor([0] + segments["length"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + num_keys, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    key_seg = torch.repeat_interleave(torch.tensor(num_keys, device=device), output_size=sum(num_keys))
    j = torch.arange(sum(num_keys), device=device) - cu_k.to(device)[:-1].long()[key_seg]
    prompt_length = seg["prompt_length"][key_seg]
    key_index = torch.where(j < prompt_length, seg["prompt_start"][key_seg] + j,  # the prompt's keys, then its own
                            seg["start"][key_seg] + j - prompt_length)
    # The longest segment and key run, rounded up to a power of two: the kernel only sizes its grid by them (blocks
    # past a segment's end exit at once), and a compiled layer specialises on their values, so every new length
    # would compile it again.
    return SegmentAttention(cu_seq_q=cu_q.to(device), cu_seq_k=cu_k.to(device), key_index=key_index,
                            max_q=_power_of_two(max(segments["length"])), max_k=_power_of_two(max(num_keys)))


def _power_of_two(value: int) -> int:
    """The least power of two >= value, at least 128."""
    return max(128, 1 << (value - 1).bit_length())


def _dense_mask(prompt_start: torch.Tensor, prompt_end: torch.Tensor, own_start: torch.Tensor) -> torch.Tensor:
    """[L, L] bool: query q (row) sees keys [prompt_start[q], prompt_end[q]) and [own_start[q], q]."""
    q = torch.arange(len(own_start), device=own_start.device)[:, None]
    kv = q.T
    return ((kv >= prompt_start[:, None]) & (kv < prompt_end[:, None])) | ((kv >= own_start[:, None]) & (kv <= q))


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: SegmentAttention,
                      scale: float | None = None) -> torch.Tensor:
    """Attention of a packed row by segments: query [1, H, L, D], key/value [1, H_kv, L, D] -> [L, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    # The kernel takes half precision only, and autocast does not reach it: cast as autocast would for SDPA.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"shared prompts on a GPU need bf16/fp16 attention (autocast or a half-precision model), "
                         f"got {dtype}: drop --learner.share-prompts")
    q = query[0].transpose(0, 1).to(dtype).contiguous()  # [L, H, D]
    k = key[0].transpose(0, 1).to(dtype)[segments.key_index]  # [Tk, H_kv, D]: a prompt's keys once per response
    v = value[0].transpose(0, 1).to(dtype)[segments.key_index]
    takes, options = _VARLEN_KEYWORDS or frozenset(), {"scale": scale}
    if q.shape[1] != k.shape[1]:  # grouped-query heads
        if "enable_gqa" in takes:
            options["enable_gqa"] = True
        elif GQA_KERNEL and "window_size" in takes:  # the kernel takes fewer K/V heads; this torch's wrapper does not
            return _GROUPED_QUERY.apply(q, k, v, segments.cu_seq_q, segments.cu_seq_k, segments.max_q,
                                        segments.max_k, scale)
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    # Causal, aligned at the end of the keys: a response's query i sees the prompt and its own tokens 0..i.
    options.update({"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True})
    return varlen_attn(q, k, v, segments.cu_seq_q, segments.cu_seq_k, segments.max_q, segments.max_k, **options)


GQA_KERNEL = True
"""grouped-query heads go to the kernel as they are (False: K/V repeated for the query heads, as a torch without
the kernel's grouped-query entry needs; kept for the benchmark that compares them)"""


def _grouped_query_function():
    """FlashAttention 2's variable-length forward and backward, given fewer K/V heads than query heads: the kernel
    reads each K/V head for its group of query heads, where repeating K/V would copy it 7 times (Qwen2.5) and sum
    the copies' gradients back. Causal aligned at the end of the keys, as `segment_attention`."""

    class FlashGroupedQuery(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None):
            out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale, window_size_left=-1,
                window_size_right=0)
            ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, unused)
            ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse, cu_q, cu_k, rng, unused = ctx.saved_tensors
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, 0.0, False, rng, unused,
                scale=ctx.scale, window_size_left=-1, window_size_right=0)
            return dq, dk, dv, None, None, None, None, None

    return FlashGroupedQuery


_GROUPED_QUERY = None
"""`_grouped_query_function()`'s class, made with `_VARLEN_KEYWORDS` (outside any compiled region)"""


_VARLEN_KEYWORDS: frozenset[str] | None = None
"""the keyword arguments this torch's `varlen_attn` takes (its signature changed between releases), read once by
`available` outside any compiled region (inspecting a signature would break a compiled layer's graph)"""


def _varlen_parameters() -> frozenset[str]:
    global _VARLEN_KEYWORDS, _GROUPED_QUERY
    if _VARLEN_KEYWORDS is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN_KEYWORDS = frozenset()
        else:
            _VARLEN_KEYWORDS = frozenset(inspect.signature(varlen_attn).parameters)
            _GROUPED_QUERY = _grouped_query_function()
    return _VARLEN_KEYWORDS


def shared_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     segments: SegmentAttention | None = None, **kwargs):
    """The attention function registered as `ATTENTION`: by segments for a packed row that carries them,
    transformers' SDPA for anything else (so the model's other forwards run as before). Returns ([B, L, H, D],
    None)."""
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return segment_attention(query, key, value, segments, scaling)[None], None


def available(device) -> bool:
    """Whether the segment kernel runs here (a CUDA device and a torch with `torch.nn.attention.varlen`)."""
    return torch.device(device).type == "cuda" and bool(_varlen_parameters())


def use_shared_attention(model: torch.nn.Module) -> None:
    """Route `model`'s attention through `shared_attention` (registered with transformers on first use): a
    packed row's segments go to the variable-length kernel, every other mask to SDPA as before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION)
