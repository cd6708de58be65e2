"""Chat templates: turn a user question into the prompt text the policy sees.

Every template returns plain text that is then tokenized *without* adding special tokens. A template that
needs a BOS token writes it into the text itself (the tokenizer's own chat template does, for models that
use one), so BOS is never added twice and never silently missing.
"""
from __future__ import annotations

from typing import Any, Callable

Question = str | list[dict[str, Any]]
"""a user question: plain text, or a list of chat messages ({"role", "content"}) for the "tokenizer" template"""

Template = Callable[[Question, Any], str]
"""`template(question, tokenizer) -> prompt text`"""

R1_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question}\nAssistant: <think>"
)
"""DeepSeek-R1-Zero's prompt (DeepSeek-AI 2025, Table 1); the response continues inside <think>"""

QWEN_MATH_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
"""Qwen2.5-Math's chat format with its chain-of-thought system prompt, written out so that it works with any
tokenizer (and matches Qwen2.5-Math's own chat template for a single user turn)"""


def _text(question: Question, template_name: str) -> str:
    if not isinstance(question, str):
        raise ValueError(
            f"the {template_name!r} template takes a plain-text question, got {type(question).__name__}; "
            "chat-message prompts need --data.template tokenizer"
        )
    return question


def none_template(question: Question, tokenizer: Any = None) -> str:
    """The question as is (base models, or data that is already templated)."""
    return _text(question, "none")


def r1_template(question: Question, tokenizer: Any = None) -> str:
    return R1_TEMPLATE.format(question=_text(question, "r1"))


def qwen_math_template(question: Question, tokenizer: Any = None) -> str:
    return QWEN_MATH_TEMPLATE.format(question=_text(question, "qwen_math"))


def tokenizer_template(question: Question, tokenizer: Any = None) -> str:
    """The tokenizer's own chat template, one user turn (or the given messages), generation prompt added."""
    if tokenizer is None:
        raise ValueError("the 'tokenizer' template needs a tokenizer; pass one to apply_template")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '?')!r}) has no "
            "chat template; use --data.template none (base models), r1 or qwen_math instead"
        )
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TEMPLATES: dict[str, Template] = {
    "none": none_template,
    "tokenizer": tokenizer_template,
    "r1": r1_template,
    "qwen_math": qwen_math_template,
}
"""template name -> function; add an entry to register a new template"""


def apply_template(name: str, question: Question, tokenizer: Any = None) -> str:
    """Render `question` through the template called `name`."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name](question, tokenizer)
