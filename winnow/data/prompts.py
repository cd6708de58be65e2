"""Load prompts: a built-in task or a dataset file -> chat template -> token ids -> `Prompt` records.

Sources (`DataConfig.train` / `.eval`): a built-in task name (see `tasks.TASKS`), a `.jsonl` / `.json` /
`.parquet` file, or a directory written by `datasets.save_to_disk` (a `Dataset`, or a `DatasetDict` whose
split is picked by name). Every failure names the file, the row or line, and the flag that fixes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from winnow.data.reasoning_gym import PREFIX as RG_PREFIX
from winnow.data.reasoning_gym import ReasoningGymTask, parse_options
from winnow.data.tasks import TASKS, make_task
from winnow.data.templates import TEMPLATES, apply_template
from winnow.types import Prompt

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where prompts come from and how they are rendered."""

    train: str = "arithmetic"
    """training prompts: a built-in task (arithmetic, arithmetic-3digit, ...), a reasoning-gym task
    (reasoning_gym:NAME, e.g. reasoning_gym:chain_sum), a .jsonl/.json/.parquet file, or a directory saved with
    `datasets.save_to_disk`"""
    eval: str | None = None
    """held-out prompts, same forms as `train`. None: a built-in task's own eval split; a DatasetDict's
    `eval_split` when it has one; otherwise `eval_fraction` of the train rows, held out of training"""
    split: str = "train"
    """the split of a DatasetDict directory to train on"""
    eval_split: str = "test"
    """the split of a DatasetDict directory to evaluate on"""
    prompt_column: str = "prompt"
    """the column holding the user question (a string, or chat messages with template 'tokenizer')"""
    answer_column: str | None = "answer"
    """the column holding the reference answer (turned into a string); None when the data has none"""
    template: str = "none"
    """chat template: none, tokenizer (the tokenizer's own), r1 (DeepSeek-R1-Zero) or qwen_math"""
    max_prompt_tokens: int = 512
    """prompts longer than this (after templating) are dropped, and the count is logged"""
    num_train_prompts: int | None = None
    """keep at most this many training prompts (the first ones); a built-in task generates this many (None: 4000)"""
    max_eval_prompts: int | None = None
    """keep at most this many eval prompts; a built-in task generates this many (None: 200)"""
    eval_fraction: float = 0.05
    """with `eval` None and a file without an eval split: the fraction of rows held out of training for eval
    (at most `max_eval_prompts`); 0 trains on every row and leaves eval empty"""
    seed: int = 0
    """seeds built-in task generation and the held-out rows of a file"""
    task_options: str | None = None
    """options of a generated task as a JSON object, e.g. '{"min_terms": 2, "max_terms": 2}' for
    --data.train reasoning_gym:chain_sum (the task's size is num_train_prompts / max_eval_prompts)"""

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")


@dataclass
class _Rows:
    """Rows of one source, before rendering."""

    rows: list[tuple[int, dict[str, Any]]]
    """(position in the source, row)"""
    origin: str
    """what error messages call the source: the path (and split)"""
    prompt_column: str
    answer_column: str | None


def load_prompts(config: DataConfig, tokenizer: Any, split: Split = "train") -> list[Prompt]:
    """The `split` prompts of `config`, templated and tokenized without added special tokens (no BOS: a model
    that needs one gets it from its chat template, `template="tokenizer"`)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if config.template not in TEMPLATES:
        raise ValueError(
            f"unknown template {config.template!r} (--data.template); valid templates: {', '.join(TEMPLATES)}"
        )
    source = _load_rows(config, split)
    prompts = _render(source, config, tokenizer)
    limit = config.num_train_prompts if split == "train" else config.max_eval_prompts
    prompts = prompts if limit is None else prompts[:limit]
    if prompts:
        lengths = [len(p.token_ids) for p in prompts]
        logger.info(
            "loaded %d %s prompts from %s (template %s; %.1f tokens on average, %d at most)",
            len(prompts), split, source.origin, config.template, sum(lengths) / len(lengths), max(lengths),
        )
    return prompts


def source_texts(config: DataConfig) -> list[str]:
    """Every text a model trained on `config` will read or write, before tokenizing: each train and eval row's
    question (through the template; the 'tokenizer' template, which needs a tokenizer, gives the raw question)
    and its answer. For training a tokenizer on the data (`winnow init-model`)."""
    texts = []
    for split in ("train", "eval"):
        source = _load_rows(config, split)
        for _, row in source.rows:
            question = row.get(source.prompt_column)
            if config.template != "tokenizer" and isinstance(question, str):
                question = apply_template(config.template, question)
            texts += [m["content"] for m in question] if isinstance(question, list) else [str(question)]
            if source.answer_column and row.get(source.answer_column) is not None:
                texts.append(str(row[source.answer_column]))
    return texts


def _load_rows(config: DataConfig, split: Split) -> _Rows:
    source = config.eval if split == "eval" and config.eval is not None else config.train
    if source in TASKS or source.startswith(RG_PREFIX):
        sizes = {"num_train": config.num_train_prompts, "num_eval": config.max_eval_prompts}
        sizes = {k: v for k, v in sizes.items() if v is not None}
        task = (ReasoningGymTask(source.removeprefix(RG_PREFIX), seed=config.seed,
                                 options=parse_options(config.task_options), **sizes)
                if source.startswith(RG_PREFIX) else make_task(source, seed=config.seed, **sizes))
        extra = getattr(task, "extra_columns", lambda q, a: {})  # e.g. a preference task's reference_response
        rows = [(i, {"prompt": q, "answer": a, **extra(q, a)}) for i, (q, a) in enumerate(task.examples(split))]
        return _Rows(rows, f"task {source!r} ({split})", "prompt", "answer")
    dict_split = config.split if split == "train" else config.eval_split
    if config.eval is not None or _has_split(config.train, config.eval_split):
        return _read(source, dict_split, config)
    return _hold_out(_read(config.train, config.split, config), config, keep_held_out=split == "eval")


def _has_split(source: str, split: str) -> bool:
    """Whether `source` is a save_to_disk DatasetDict directory with a split called `split`."""
    import datasets  # imported on use: winnow.data loads without `datasets` (the GPU benchmark machine has none)
    path = Path(source)
    if not path.is_dir():
        return False
    dataset = _load_from_disk(path)
    return isinstance(dataset, datasets.DatasetDict) and split in dataset


def _hold_out(source: _Rows, config: DataConfig, keep_held_out: bool) -> _Rows:
    """Split a file's rows into train and held-out eval when there is no eval source: a seeded random
    `eval_fraction` of the rows (at most `max_eval_prompts`), the same rows for the train and eval calls."""
    num_rows = len(source.rows)
    num_eval = round(config.eval_fraction * num_rows)
    if config.eval_fraction > 0 and num_rows >= 2:
        num_eval = max(num_eval, 1)
    if config.max_eval_prompts is not None:
        num_eval = min(num_eval, config.max_eval_prompts)
    held_out = set(random.Random(f"holdout:{config.seed}").sample(range(num_rows), num_eval))
    if not held_out and not keep_held_out:
        return source
    rows = [row for k, row in enumerate(source.rows) if (k in held_out) == keep_held_out]
    origin = f"{source.origin} ({'held-out ' if keep_held_out else ''}{len(rows)} of {num_rows} rows)"
    return _Rows(rows, origin, source.prompt_column, source.answer_column)


def _read(source: str, dict_split: str, config: DataConfig) -> _Rows:
    """Rows of a file or save_to_disk directory, after checking that the configured columns exist."""
    import datasets
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data {source!r} not found: it is neither a built-in task ({', '.join(TASKS)}) nor an existing "
            "file or directory; fix --data.train / --data.eval"
        )
    origin = str(path)
    if path.is_dir():
        dataset = _load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if dict_split not in dataset:
                flag = "--data.split" if dict_split == config.split else "--data.eval-split"
                raise ValueError(
                    f"{path} has splits {', '.join(dataset)} but no {dict_split!r}; set {flag} to one of them"
                )
            dataset, origin = dataset[dict_split], f"{path} [{dict_split}]"
    else:
        dataset = _load_file(path)
    _check_columns(dataset.column_names, origin, config)
    return _Rows(list(enumerate(dataset.to_list())), origin, config.prompt_column, config.answer_column)


def _check_columns(columns: list[str], origin: str, config: DataConfig) -> None:
    present = ", ".join(columns)
    if config.prompt_column not in columns:
        raise ValueError(
            f"{origin} has no prompt column {config.prompt_column!r} (columns: {present}); set "
            "--data.prompt-column to the column holding the questions"
        )
    if config.answer_column is not None and config.answer_column not in columns:
        raise ValueError(
            f"{origin} has no answer column {config.answer_column!r} (columns: {present}); set "
            "--data.answer-column to the column holding reference answers, or to None if the data has none"
        )


def _load_file(path: Path) -> datasets.Dataset:
    import datasets
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unsupported format {path.suffix or '(no extension)'!r}; use .jsonl, .json, .parquet, or a "
            "directory saved with datasets.save_to_disk (e.g. convert with `datasets.Dataset.from_csv(...)"
            ".to_json('data.jsonl')`)"
        )
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        problem = _find_json_error(path) if builder == "json" else None
        raise ValueError(f"{path}: {problem or _describe(error)}") from error


def _load_from_disk(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    import datasets
    try:
        with _quiet_datasets():
            return datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(
            f"{path} is a directory but not one written by datasets.save_to_disk ({error}); point --data.train "
            "at a .jsonl/.json/.parquet file or at a save_to_disk directory"
        ) from error


def _find_json_error(path: Path) -> str | None:
    """The first line of a JSON / JSON-lines file that does not parse, as a message; None if all parse."""
    text = path.read_text()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole_file_error:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                if number == 1 and not line.lstrip().startswith("{"):  # a (pretty-printed) JSON document
                    e = whole_file_error
                    return f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                return f"line {number} is not valid JSON ({error.msg}): {line[:120]!r}"
    return None


def _describe(error: BaseException) -> str:
    """datasets wraps the real cause; show the innermost message."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"could not load it: {type(error).__name__}: {error}"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _render(source: _Rows, config: DataConfig, tokenizer: Any) -> list[Prompt]:
    """Validate, template and tokenize rows; drop (and log) the prompts over `max_prompt_tokens`."""
    texts, kept = [], []
    for index, row in source.rows:
        question = row.get(source.prompt_column)
        _check_question(question, index, source, config.template)
        texts.append(apply_template(config.template, question, tokenizer))
        kept.append((index, row))
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    _check_encodable(texts, token_ids, kept, source, tokenizer)
    prompts, too_long = [], []
    for text, ids, (index, row) in zip(texts, token_ids, kept):
        if len(ids) > config.max_prompt_tokens:
            too_long.append((index, len(ids)))
            continue
        answer = row.get(source.answer_column) if source.answer_column else None
        others = {k: v for k, v in row.items() if k not in (source.prompt_column, source.answer_column)}
        prompts.append(Prompt(text, list(ids), None if answer is None else str(answer), others, index))
    if too_long:
        longest = max(too_long, key=lambda item: item[1])
        logger.warning(
            "dropped %d of %d prompts from %s longer than max_prompt_tokens=%d (longest: row %d, %d tokens); "
            "raise --data.max-prompt-tokens to keep them",
            len(too_long), len(texts), source.origin, config.max_prompt_tokens, *longest,
        )
    if texts and not prompts:
        raise ValueError(
            f"all {len(texts)} prompts from {source.origin} are longer than max_prompt_tokens="
            f"{config.max_prompt_tokens}; raise --data.max-prompt-tokens"
        )
    return prompts


def _check_encodable(texts: list[str], token_ids: list[list[int]], kept: list[tuple[int, dict]], source: _Rows,
                     tokenizer: Any) -> None:
    """Warn (with the count and an example) about prompts holding characters the tokenizer cannot encode (they
    become its unknown token); refuse a prompt left with no known token at all."""
    unk = getattr(tokenizer, "unk_token_id", None)
    lossy = []
    for text, ids, (index, _) in zip(texts, token_ids, kept):
        known = [i for i in ids if i != unk]
        if not known:
            raise ValueError(f"{source.origin}, row {index}: the prompt {text[:80]!r} is empty once tokenized: the "
                             f"tokenizer knows none of its characters; fix the row, or use a model whose tokenizer "
                             f"covers the data (--model.tokenizer)")
        if len(known) < len(ids):
            lossy.append((index, text))
    if lossy:
        index, text = lossy[0]
        logger.warning("%d of %d prompts from %s hold characters the tokenizer cannot encode (they become %r); "
                       "the first: row %d, %.80r", len(lossy), len(texts), source.origin,
                       getattr(tokenizer, "unk_token", None), index, text)


def _check_question(question: Any, index: int, source: _Rows, template: str) -> None:
    is_messages = (
        isinstance(question, list)
        and len(question) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in question)
    )
    if is_messages and template == "tokenizer":
        return
    if isinstance(question, str) and question.strip():
        return
    if is_messages:
        problem = "is a list of chat messages, which only --data.template tokenizer can render"
    else:
        problem = f"is {question!r} ({type(question).__name__}); every prompt must be a non-empty string"
    raise ValueError(
        f"{source.origin}, row {index}: prompt column {source.prompt_column!r} {problem}; fix or remove the row"
    )
