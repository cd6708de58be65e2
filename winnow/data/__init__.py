"""Prompts and tasks: chat templates, dataset loading, built-in verifiable tasks, tiny CPU models."""
from winnow.data.prompts import DataConfig, load_prompts
from winnow.data.sampler import PromptSampler, batches
from winnow.data.tasks import TASKS, ArithmeticTask, Task, make_task
from winnow.data.templates import TEMPLATES, apply_template
from winnow.data.tiny import (
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    build_tiny_model,
    load_tiny,
    save_tiny,
    save_tokenizer,
    tiny_qwen2_config,
    train_char_tokenizer,
)

__all__ = [
    "DataConfig",
    "load_prompts",
    "PromptSampler",
    "batches",
    "TASKS",
    "ArithmeticTask",
    "Task",
    "make_task",
    "TEMPLATES",
    "apply_template",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "build_tiny_model",
    "load_tiny",
    "save_tiny",
    "save_tokenizer",
    "tiny_qwen2_config",
    "train_char_tokenizer",
]
