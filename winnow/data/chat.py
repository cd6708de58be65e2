"""Chat data for multi-turn SFT: conversations, the assistant-token mask, and a built-in two-round dialogue task.

A conversation is a list of `{"role", "content"}` turns (roles system, user, assistant; several rounds), the
`messages` column of the ecosystem's chat datasets. It is rendered with the tokenizer's chat template, and the
loss falls on assistant tokens only. The mask is exact in both kinds of template:

- templates that mark generation (`{% generation %}...{% endgeneration %}`, as TRL and transformers expect):
  transformers' own `return_assistant_tokens_mask`;
- templates that don't: the conversation is rendered turn by turn, and an assistant turn is the text its
  rendering adds after the prefix rendered with the generation prompt, minus trailing whitespace (the separator
  between turns, which the model never generates: it stops at the end-of-turn token, which *is* trained on).
  Tokens whose characters lie inside such a span are trained on. A template that does not render incrementally
  (a prefix's text is not a prefix of the whole) is refused with a message, never guessed at.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from pathlib import Path
from typing import Any, Literal

from winnow.lazy import lazy_import
from winnow.data.prompts import DataConfig, _load_file, _load_from_disk
from winnow.types import Prompt

datasets = lazy_import("datasets")

ROLES = ("system", "user", "assistant")
Split = Literal["train", "eval"]
Messages = list[dict[str, str]]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_conversation(messages: Any, where: str) -> Messages:
    """`messages` as a list of {"role", "content"} turns, or one clear error naming the row and the problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: empty conversation ({messages!r}); every row needs a non-empty list of "
                         "{'role', 'content'} turns; fix or remove the row")
    turns = []
    for k, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"{where}, turn {k}: {turn!r} is not a {{'role', 'content'}} dict; fix or remove the row")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}, turn {k}: unknown role {turn['role']!r}; roles are {', '.join(ROLES)}; "
                             "fix or remove the row")
        if not isinstance(turn["content"], str):
            raise ValueError(f"{where}, turn {k}: content is {type(turn['content']).__name__}, not text; fix or "
                             "remove the row")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError(f"{where}: no assistant turn, so nothing to train on; fix or remove the row")
    return turns


def has_generation_markers(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template marks assistant text with `{% generation %}`."""
    return bool(_GENERATION_TAG.search(_chat_template(tokenizer)))


def render_conversation(messages: Messages, tokenizer: Any, *, last_only: bool = False
                        ) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation rendered with the tokenizer's chat template, no special
    tokens added beyond what the template writes. mask[t] = 1 where token t belongs to an assistant turn (every
    one, or the last only), end-of-turn token included."""
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if last_only:
            mask = _last_run(mask)
        return ids, mask
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(messages, tokenizer, text)
    if last_only:
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(end > start and any(a <= start and end <= b for a, b in spans))
            for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def assistant_spans(messages: Messages, tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn in `text` (the whole conversation's rendering),
    found by rendering incrementally: a turn is what its rendering adds after the generation prompt."""
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render incrementally (a conversation's prefix does not render to a "
                "prefix of the whole), so assistant tokens cannot be found by diffing; use a template that marks "
                "them with {% generation %} ... {% endgeneration %} (--model.tokenizer)")
        spans.append((len(before), len(through.rstrip())))
    return spans


def _last_run(mask: list[int]) -> list[int]:
    """Only the last contiguous run of ones kept."""
    out = [0] * len(mask)
    t = len(mask) - 1
    while t >= 0 and not mask[t]:
        t -= 1
    while t >= 0 and mask[t]:
        out[t] = 1
        t -= 1
    return out


def _chat_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '?')!r}) has no chat "
            "template, and chat data is rendered with it; use a chat model's tokenizer (--model.tokenizer) or build "
            "one with `winnow init-model`")
    return template if isinstance(template, str) else str(template)


def conversation_prompt(messages: Messages, tokenizer: Any, index: int) -> Prompt:
    """The held-out question of a conversation: every turn before its last assistant turn, rendered with the
    generation prompt; the reference is that assistant turn's content (what the policy must answer)."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(text, list(ids), messages[last]["content"], {}, index)


# ---------------------------------------------------------------------------------------------- the task

class DialogueTask:
    """A two-round arithmetic dialogue whose second round refers to the first round's answer:

        user "3+4="  assistant "7"  user "+5="  assistant "12"

    Operands are 1..`max_operand`; the second answer needs the first (it is never in the second question). Split
    by a hash of (seed, conversation): held-out conversations never appear in training.
    """

    def __init__(self, seed: int = 0, num_train: int = 4000, num_eval: int = 200, max_operand: int = 9,
                 eval_fraction: float = 0.1):
        self.seed, self.num_train, self.num_eval = seed, num_train, num_eval
        self.max_operand, self.eval_fraction = max_operand, eval_fraction

    def conversations(self, split: Split) -> list[Messages]:
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} must be 'train' or 'eval'")
        return list(self._train if split == "train" else self._eval)

    def _is_held_out(self, key: str) -> bool:
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.eval_fraction

    def _draw(self, count: int, is_eval: bool) -> list[Messages]:
        n = self.max_operand
        keys = [(a, b, c) for a in range(1, n + 1) for b in range(1, n + 1) for c in range(1, n + 1)]
        random.Random(f"dialogue:{self.seed}").shuffle(keys)
        keys = [k for k in keys if self._is_held_out(str(k)) == is_eval]
        if count > len(keys):  # a small space: cycle through it (the train split is an endless stream anyway)
            if is_eval:
                count = len(keys)
            else:
                keys = keys * -(-count // len(keys))
        return [_dialogue(*k) for k in keys[:count]]

    @functools.cached_property
    def _train(self) -> list[Messages]:
        return self._draw(self.num_train, is_eval=False)

    @functools.cached_property
    def _eval(self) -> list[Messages]:
        return self._draw(self.num_eval, is_eval=True)

    def texts(self) -> list[str]:
        """Every turn's text (for training a tokenizer on the task)."""
        return [t["content"] for split in ("train", "eval") for m in self.conversations(split) for t in m]


def _dialogue(a: int, b: int, c: int) -> Messages:
    return [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"+{c}="}, {"role": "assistant", "content": str(a + b + c)}]


CHAT_TASKS = {"dialogue": DialogueTask}
"""built-in chat task name -> factory taking `seed`, `num_train`, `num_eval`"""

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""The tiny chat template: one marker token per role, and an assistant turn ends with EOS (so generation stops
there). No {% generation %} tags: its mask comes from incremental rendering."""
ROLE_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]


def add_chat_template(tokenizer: Any, template: str = TINY_CHAT_TEMPLATE) -> Any:
    """Give a locally trained tokenizer the role markers (one token each) and a chat template."""
    tokenizer.add_special_tokens({"additional_special_tokens": ROLE_MARKERS})
    tokenizer.chat_template = template
    return tokenizer


# ---------------------------------------------------------------------------------------------- loading

def is_chat_source(config: DataConfig, column: str | None) -> bool:
    """Whether `config.train` is chat data: a built-in chat task, or a file/dataset with the messages column."""
    if column is None:
        return False
    if config.train in CHAT_TASKS:
        return True
    path = Path(config.train)
    if not path.exists():
        return False
    return column in _dataset(path, config.split).column_names


def load_conversations(config: DataConfig, column: str, split: Split) -> list[tuple[int, Messages]]:
    """(row index, checked conversation) of the `split`: a built-in chat task's split, `config.eval` for eval when
    given, else a seeded `eval_fraction` of the train rows held out (the same rows on every call)."""
    source = config.eval if split == "eval" and config.eval is not None else config.train
    limit = config.num_train_prompts if split == "train" else config.max_eval_prompts
    if source in CHAT_TASKS:
        sizes = {"num_train": config.num_train_prompts, "num_eval": config.max_eval_prompts}
        task = CHAT_TASKS[source](seed=config.seed, **{k: v for k, v in sizes.items() if v is not None})
        return list(enumerate(task.conversations(split)))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"chat data {source!r} not found: neither a built-in chat task "
                                f"({', '.join(CHAT_TASKS)}) nor a file or directory; fix --data.train / --data.eval")
    dataset = _dataset(path, config.split if source == config.train else config.eval_split)
    if column not in dataset.column_names:
        raise ValueError(f"{path} has no messages column {column!r} (columns: {', '.join(dataset.column_names)}); "
                         "set --messages-column")
    rows = list(enumerate(dataset[column]))
    if config.eval is None:  # hold out a seeded fraction of the train rows
        num_eval = max(round(config.eval_fraction * len(rows)), 1 if config.eval_fraction > 0 else 0)
        if config.max_eval_prompts is not None:
            num_eval = min(num_eval, config.max_eval_prompts)
        held_out = set(random.Random(f"holdout:{config.seed}").sample(range(len(rows)), num_eval))
        rows = [r for r in rows if (r[0] in held_out) == (split == "eval")]
    out = [(i, check_conversation(m, f"{path}, row {i}")) for i, m in rows]
    return out if limit is None else out[:limit]


def _dataset(path: Path, split: str) -> datasets.Dataset:
    if not path.is_dir():
        return _load_file(path)
    dataset = _load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has splits {', '.join(dataset)} but no {split!r}; set --data.split")
        dataset = dataset[split]
    return dataset
