"""`winnow train rm`: train a reward model on preference pairs, for `--oracle.kind reward_model` (in-process) or
`winnow serve-oracle --oracle.kind reward_model` (served), the classic RLHF pipeline's middle step.

The data are `{prompt, chosen, rejected}` rows, loaded like offline DPO's (a .jsonl/.json/.parquet file, a
`save_to_disk` directory, or a built-in task with `--chosen-column`/`--rejected-column` naming two of its columns,
e.g. `arithmetic-pref`'s `answer` and `reference_response`). The model is a sequence-classification head
(`num_labels=1`) on `--model.path`, any causal LM or encoder `transformers` knows (`AutoModelForSequenceClassification`;
the head starts fresh). Each iteration is one optimizer step on `batch_size` pairs, loss `bradley_terry_loss`.
The model reads each side as the text pair (prompt text, response text), truncated to `max_length` tokens: the
tokenisation `RewardModelOracle` and the served model use, so the scores it learns are the scores it serves.
Saved with `save_pretrained` to RUN_DIR/final (with its tokenizer): `--oracle.reward-model.path RUN_DIR/final`.

`--kind pairwise` trains a pairwise preference model instead (`winnow.oracles.pairwise`): the same head reads
(prompt, a SEP b), and a pair's two rows are (chosen SEP rejected) and (rejected SEP chosen), so the same
Bradley-Terry loss trains f(x, chosen, rejected) - f(x, rejected, chosen), the log-odds the pairwise oracle
reports, and the held-out accuracy is the share of pairs it prefers the right way. Use it with
`--oracle.kind pairwise --oracle.pairwise.path RUN_DIR/final` (or serve it with `winnow serve-oracle --oracle.kind
pairwise`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from winnow.lazy import lazy_import
from winnow.data import DataConfig, load_prompts
from winnow.data.sampler import batches
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.lora import LoraConfig, apply_lora
from winnow.logging import LoggingConfig
from winnow.loops.base import Loop
from winnow.loops.reward_model import RewardModelFamily, ScoredPair, sequence_scores
from winnow.oracles.pairwise import pairwise_texts
from winnow.oracles.reward_model import KIND_KEY, encode_pairs
from winnow.recipes.base import RunConfig, finish, open_run, run_loop
from winnow.setup import ModelConfig, load_tokenizer, resolve_device, setup_process, start_compile_workers
from winnow.types import Prompt

torch = lazy_import("torch")


@dataclass(kw_only=True)
class RewardModelTrainConfig(RunConfig):
    """A reward-model run: `winnow train rm`."""

    kind: Literal["scalar", "pairwise"] = "scalar"
    """scalar: a score per (prompt, response), for --oracle.kind reward_model (RL rewards and comparisons);
    pairwise: P(a beats b) read off (prompt, a SEP b) in both orders, for --oracle.kind pairwise (comparisons only)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the backbone: a causal LM or an encoder; a sequence-classification head with one output goes on top"""
    data: DataConfig = field(default_factory=lambda: DataConfig(answer_column=None))
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=1e-4, warmup_steps=10))
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (`--lora-rank 8`); the score head is always trained in full"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    chosen_column: str = "chosen"
    """the column holding the preferred response"""
    rejected_column: str = "rejected"
    """the column holding the other response"""
    margin_column: str | None = None
    """a column holding how much the chosen response should win by (Llama 2's margin); None: no margin"""
    centring_coef: float = 0.0
    """weight of the centring term mean((r_c + r_r)^2), which keeps scores near 0 (Eisenstein et al. 2023)"""
    batch_size: int = 32
    """pairs per optimizer step"""
    num_steps: int = 200
    """optimizer steps (one per iteration)"""
    max_length: int = 512
    """tokens of one (prompt, response) pair the model reads; longer pairs are truncated"""
    eval_every: int = 20
    """iterations between held-out evaluations (0: only at the start and the end)"""
    max_eval_pairs: int = 256
    """held-out pairs scored at each evaluation"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_steps < 1 or self.max_length < 1:
            raise ValueError(f"batch_size={self.batch_size}, num_steps={self.num_steps} and max_length="
                             f"{self.max_length} must be >= 1")
        if self.centring_coef < 0:
            raise ValueError(f"centring_coef={self.centring_coef} must be >= 0")
        if self.kind not in ("scalar", "pairwise"):
            raise ValueError(f"kind={self.kind!r} must be scalar or pairwise (--kind)")


def reward_pairs(prompts: list[Prompt], tokenizer, config: RewardModelTrainConfig, source: str) -> list[ScoredPair]:
    """(chosen ids, rejected ids, margin) per row; a row without non-empty chosen/rejected strings is an error."""
    sides: dict[str, list[str]] = {config.chosen_column: [], config.rejected_column: []}
    margins = []
    for p in prompts:
        for column in sides:
            # a built-in task's `answer` (or --data.answer-column) is the prompt's reference, not a column
            text = p.columns.get(column, p.reference if column in ("answer", config.data.answer_column) else None)
            if not isinstance(text, (str, int, float)) or str(text) == "":
                raise ValueError(f"{source}, row {p.index}: {column!r} must be a non-empty string, got {text!r}; "
                                 f"reward-model data has rows {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}} "
                                 f"(other column names: --chosen-column, --rejected-column)")
            sides[column].append(str(text))
        margin = 0.0
        if config.margin_column is not None:
            value = p.columns.get(config.margin_column)
            if not isinstance(value, (int, float)):
                raise ValueError(f"{source}, row {p.index}: margin column {config.margin_column!r} must be a number, "
                                 f"got {value!r} (--margin-column)")
            margin = float(value)
        margins.append(margin)
    texts = [p.text for p in prompts]
    chosen, rejected = sides[config.chosen_column], sides[config.rejected_column]
    if config.kind == "pairwise":  # the two orders of the pair (module doc)
        chosen, rejected = pairwise_texts(tokenizer, chosen, rejected), pairwise_texts(tokenizer, rejected, chosen)
    return list(zip(encode_pairs(tokenizer, texts, chosen, config.max_length),
                    encode_pairs(tokenizer, texts, rejected, config.max_length), margins))


def load_reward_backbone(config: RewardModelTrainConfig):
    """A `num_labels=1` sequence-classification model on `--model.path` (fp32, CPU) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    if config.model.path is None:
        raise ValueError("no model given: pass --model.path (a causal LM or an encoder to put a reward head on)")
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path, config.model.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model.path, num_labels=1, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code)
    # A causal-LM head reads the last token that is not padding: it needs to know the padding id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _lora(config: LoraConfig, model: torch.nn.Module) -> LoraConfig:
    """The score head (`score` on causal LMs, `classifier` on encoders) trained in full beside the adapters."""
    if not config.enabled or config.modules_to_save:
        return config
    head = "score" if hasattr(model, "score") else "classifier"
    return dataclasses.replace(config, modules_to_save=[head])


def train_reward_model(config: RewardModelTrainConfig, model=None, tokenizer=None) -> Path:
    """Train a reward model on the configured pairs; returns the run directory (the model is in RUN_DIR/final)."""
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    start_compile_workers(device, config.learner.compile)
    if model is None:
        model, tokenizer = load_reward_backbone(config)
    if config.kind == "pairwise":  # saved into config.json: the oracles tell the two kinds apart by it
        setattr(model.config, KIND_KEY, "pairwise")
    data = config.data
    train = reward_pairs(load_prompts(data, tokenizer, "train"), tokenizer, config, data.train)
    held_out = reward_pairs(load_prompts(data, tokenizer, "eval"), tokenizer, config, data.eval or data.train)
    if not train:
        raise ValueError(f"{data.train} has no training pairs; a run that trains nothing is an error")
    model = apply_lora(model, _lora(config.lora, model), task_type="SEQ_CLS")
    learner = Learner(model, config.learner, config.num_steps, device=device, forward=sequence_scores)
    run_dir = open_run(config, "rm", learner.is_main)

    def make_loop(logger, bar) -> Loop:
        family = RewardModelFamily(
            learner=learner, pairs=batches(train, config.batch_size, seed=config.seed),
            # every rank evaluates: a sharded model's forward is a collective (rank 0 alone would hang)
            eval_pairs=held_out[: config.max_eval_pairs],
            centring_coef=config.centring_coef, pad_token_id=tokenizer.pad_token_id)
        return Loop(family, learner=learner, actor=None, num_iterations=config.num_steps,
                    eval_every=config.eval_every, logger=logger, run_dir=run_dir, progress=bar)

    run_loop(config, run_dir, learner, make_loop, total=config.num_steps, desc="rm")
    return finish(config, run_dir, learner, tokenizer)
