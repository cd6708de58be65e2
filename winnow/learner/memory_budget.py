"""Micro-batch sizing from a memory budget: how many tokens a micro-batch may hold so that its saved activations
fit a fraction of the device memory that is free when the step starts (`--learner.micro-batch-memory`)."""
from __future__ import annotations

from winnow.lazy import lazy_import

torch = lazy_import("torch")

HEAD_CHUNK_ROWS = 2048
"""rows of logits the fused head holds at once (`linear_logprobs`' chunk): a fixed workspace, not per token"""


def activation_bytes_per_token(config) -> int:
    """Bytes one token's saved activations take in a training forward of a Llama-family decoder (bf16 autocast,
    no activation checkpointing): per layer about 7 hidden-size values (the norms' inputs and outputs, q, the
    attention output, the residuals), 4 intermediate-size values (gate, up, the activation and the product) and
    the token's K and V, 2 bytes each.

    Checked against one H200 (`benchmarks/learner_profile.py`): Qwen2.5-0.5B took 1.26 MB a token between the
    20,480- and 40,960-token budgets (estimate 1.25 MB), Qwen2.5-1.5B ~2.5 MB (estimate 2.64 MB)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_layer = 7 * config.hidden_size + 4 * config.intermediate_size + kv
    return config.num_hidden_layers * per_layer * 2


def budget_tokens(fraction: float, free_bytes: int, reserved_bytes: int, bytes_per_token: int) -> int:
    """Tokens of padded width a micro-batch may hold: `fraction` of the free memory, less what the step needs
    whatever the micro-batch (`reserved_bytes`: gradients not allocated yet, the head's workspace), at
    `bytes_per_token`; at least 1 (a sequence longer than the budget trains alone)."""
    return max(1, int(fraction * max(free_bytes - reserved_bytes, 0)) // bytes_per_token)


def free_device_bytes(device) -> int:
    """Memory a step can still allocate on `device`: the device's free memory and what PyTorch's caching
    allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def step_reserve_bytes(model, vocab_size: int) -> int:
    """What a step allocates besides the activations: the gradients of parameters that have none yet (this
    rank's shard under FSDP2) and the head's float32 logits workspace (a chunk of rows, forward and backward)."""
    grads = 0
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            local = param.to_local() if hasattr(param, "to_local") else param
            grads += local.numel() * local.element_size()
    return grads + 3 * HEAD_CHUNK_ROWS * vocab_size * 4
