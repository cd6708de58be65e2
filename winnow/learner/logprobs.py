"""Per-token log-probabilities of a TrainBatch under a model: the quantity every loss in winnow starts from."""
from __future__ import annotations

import torch

from winnow.types import TrainBatch


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


def sequence_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token of `batch.input_ids` given the tokens before it, [B, T] float32.

    Position t holds log p(input_ids[t] | input_ids[:t]) (0 at t=0 and off the response mask), aligned
    with `TrainBatch.response_mask`. Logits are divided by `temperature`, the sampling temperature, so the
    result is comparable with the engine's logprobs (which are taken under logits / temperature).
    Only the columns from the first response token on are projected to the vocabulary.
    """
    input_ids, mask = batch.input_ids, batch.response_mask
    # The first column any row needs a logit for: one before its first response token.
    has_response = mask.any(dim=0).nonzero()
    first = int(has_response[0]) if len(has_response) else input_ids.shape[1] - 1
    first = max(first - 1, 0)
    positions = batch.attention_mask.cumsum(-1).clamp(min=1) - 1
    # Project only the needed columns (`logits_to_keep` keeps the last T - first): the prompt columns never
    # reach the vocabulary. One call of the whole model, not decoder then head, because sharded strategies
    # (FSDP2, DeepSpeed ZeRO-3) gather the root's parameters (embeddings, head) in the root's forward.
    out = model(input_ids=input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                logits_to_keep=input_ids.shape[1] - first, use_cache=False)
    logits = out.logits[:, :-1]  # [B, T - 1 - first, V]
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, first + 1 :]
    picked = selective_logprobs(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).view(labels.shape)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, first + 1 :] = picked
    return out * mask
