"""`winnow init-model`: a small randomly initialised model with a tokenizer trained on a task's or a file's text.

For trying a task on CPU when no pretrained model fits it (its characters outside another model's vocabulary):

    winnow init-model --data.train reasoning_gym:chain_sum --output-dir models/chain_sum --size tiny
    winnow sft --model.path models/chain_sum ...        # the warm start that makes RL possible
    winnow train grpo --model.path runs/sft-.../final ...

The tokenizer is character-level (see `winnow.data.tiny`), trained on every prompt (after `--data.template`) and
answer of the data, or on every turn of chat data, plus the tiny chat template's role markers (one token each,
`--chat-template`). The model is Qwen2-shaped, float32, tied embeddings; the folder loads with `--model.path`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from winnow.data import DataConfig
from winnow.data.chat import ROLE_MARKERS, add_chat_template, is_chat_source, load_conversations
from winnow.data.prompts import source_texts
from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer

log = logging.getLogger(__name__)

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=512),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_size=1024),
}
"""model shapes: tiny ~0.5M parameters (the quickstart's, ~10 s of SFT on CPU), small ~3.4M; head_dim is 64 in
both (vLLM's CPU build rejects 16)"""


@dataclass
class InitModelConfig:
    """Train a character tokenizer on the data and write a small random model that --model.path accepts."""

    output_dir: str = "models/tiny"
    """where the model and tokenizer are written"""
    data: DataConfig = field(default_factory=DataConfig)
    """the text the tokenizer learns: --data.train (and --data.eval) as a task name or a file"""
    size: Literal["tiny", "small"] = "tiny"
    """the model's shape (see SIZES)"""
    max_position_embeddings: int = 128
    """the longest prompt + response the model takes (raise it for long templates: r1's alone is ~330 characters)"""
    chat_template: bool = True
    """add role markers (<|system|>, <|user|>, <|assistant|>, one token each) and a chat template, so chat data and
    `--data.template tokenizer` work"""
    messages_column: str = "messages"
    """chat data: the column of conversations"""
    all_bytes: bool = False
    """put all 256 bytes in the vocabulary (259 ids), so text never seen in the data still tokenizes"""
    seed: int = 0
    """seeds the model's initial weights"""


def init_model(config: InitModelConfig) -> Path:
    """Write the tokenizer and model to `config.output_dir`; returns it."""
    if is_chat_source(config.data, config.messages_column):
        texts = [t["content"] for split in ("train", "eval")
                 for _, m in load_conversations(config.data, config.messages_column, split) for t in m]
    else:
        texts = source_texts(config.data)
    tokenizer = train_char_tokenizer(texts, include_all_bytes=config.all_bytes)
    if config.chat_template:
        add_chat_template(tokenizer)
    model = build_tiny_model(tokenizer, seed=config.seed, max_position_embeddings=config.max_position_embeddings,
                             **SIZES[config.size])
    out = save_tiny(model, tokenizer, config.output_dir)
    log.info("wrote a %s model (%.2fM parameters, vocabulary %d%s) to %s", config.size,
             sum(p.numel() for p in model.parameters()) / 1e6, len(tokenizer),
             f" with role markers {' '.join(ROLE_MARKERS)}" if config.chat_template else "", out)
    return out
