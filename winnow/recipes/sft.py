"""`winnow sft`: supervised fine-tuning, also the warm start of the quickstart.

Two kinds of data:
- prompts with a target completion: the dataset's answer column (`--data.answer-column`) is the completion, the
  tokenizer's EOS is appended, and the loss is the token-mean NLL of the completion tokens only;
- chat conversations (a `messages` column of {role, content} turns, or a built-in chat task such as `dialogue`):
  rendered with the tokenizer's chat template, the loss on assistant turns only (all, or the last), short
  conversations packed into rows of `max_seq_tokens` with attention kept inside each conversation.
Held-out accuracy is evaluated through the oracle as it goes (for chat data, on each held-out conversation's last
assistant turn), and for chat data the held-out conversations' loss and assistant-token accuracy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from winnow.data import DataConfig, load_prompts
from winnow.data.chat import conversation_prompt, is_chat_source, load_conversations, render_conversation
from winnow.engines.static_decode import SUPPORTED_MODEL_TYPES
from winnow.engines import make_engine
from winnow.engines.hf import HFEngine
from winnow.engines.vllm import VLLMEngineConfig
from winnow.learner.batch import make_chat_batch, make_sft_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.lora import LoraConfig, apply_lora
from winnow.learner.sync import sync_weights
from winnow.logging import LoggingConfig
from winnow.loops.base import Loop
from winnow.loops.config import EvalConfig
from winnow.loops.sft import SFTFamily
from winnow.oracles import OracleConfig, check_oracle_config, make_oracle
from winnow.recipes.base import RunConfig, finish, open_run, run_loop
from winnow.setup import ModelConfig, load_policy, resolve_device, setup_process, start_compile_workers
from winnow.types import Prompt

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTConfig(RunConfig):
    """A supervised fine-tuning run: `winnow sft`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(lr=1e-5, warmup_steps=10))
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (`--lora-rank 8`)"""
    oracle: OracleConfig = field(default_factory=OracleConfig)
    """judges held-out accuracy during SFT (the first reward function is the verifier)"""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, k=0))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine_backend: Literal["hf", "vllm"] = "hf"
    """what samples the held-out answers: "hf" (embedded) or "vllm" (loads --model.path once, gets the learner's
    weights before each evaluation; settings in `vllm_engine`)"""
    vllm_engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    """settings of the vllm engine, used when engine_backend is \"vllm\""""
    batch_size: int = 64
    """sequences per optimizer step"""
    num_steps: int = 500
    """optimizer steps"""
    max_tokens: int = 64
    """generation budget of the held-out evaluation"""
    messages_column: str | None = "messages"
    """chat data: the column of conversations ({role, content} turns); when the data has it, or --data.train is a
    built-in chat task (dialogue), SFT trains on assistant turns. None: prompt/answer pairs always"""
    assistant_turns: Literal["all", "last"] = "all"
    """chat data: train on every assistant turn of a conversation, or on the last one only"""
    packing: bool = True
    """chat data: pack conversations into rows of max_seq_tokens, each attending only to itself (Llama/Qwen-family
    models through transformers' packed positions; others train unpacked)"""
    max_seq_tokens: int = 1024
    """chat data: the packed row length; longer conversations are dropped (the count is logged)"""


def sft_pairs(prompts: list[Prompt], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) for each prompt; its reference is the completion."""
    pairs = []
    for p in prompts:
        if p.reference is None:
            raise ValueError(
                f"row {p.index} has no completion: SFT trains on the answer column (--data.answer-column)"
            )
        ids = tokenizer(p.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((p.token_ids, ids))
    return pairs


def chat_data(config: SFTConfig, tokenizer, model):
    """Chat SFT's (examples, make_batch, eval prompts, held-out batch): each conversation rendered with the chat
    template into (ids, assistant mask); those over `max_seq_tokens` dropped with a warning."""
    last_only = config.assistant_turns == "last"

    def render(split: str) -> list[tuple[list[int], list[int]]]:
        rows = load_conversations(config.data, config.messages_column, split)
        examples = [render_conversation(m, tokenizer, last_only=last_only) for _, m in rows]
        kept = [e for e in examples if len(e[0]) <= config.max_seq_tokens]
        if len(kept) < len(examples):
            log.warning("dropped %d of %d %s conversations longer than max_seq_tokens=%d; raise --max-seq-tokens "
                        "to keep them", len(examples) - len(kept), len(examples), split, config.max_seq_tokens)
        if split == "train" and not kept:
            raise ValueError(f"no training conversation fits max_seq_tokens={config.max_seq_tokens}; raise "
                             "--max-seq-tokens")
        return kept

    train = render("train")
    packing = config.packing and getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
    if config.packing and not packing:
        log.warning("packing is on but %s is not a Llama/Qwen-family model; training unpacked",
                    getattr(model.config, "model_type", type(model).__name__))
    make_batch = partial(make_chat_batch, pad_token_id=tokenizer.pad_token_id,
                         pack_length=config.max_seq_tokens if packing else None)
    rows = load_conversations(config.data, config.messages_column, "eval")[: config.eval.max_prompts]
    eval_prompts = [conversation_prompt(m, tokenizer, i) for i, m in rows]
    heldout_examples = render("eval")[: config.eval.max_prompts]
    heldout = make_batch(heldout_examples) if heldout_examples else None
    return train, make_batch, eval_prompts, heldout


def train_sft(config: SFTConfig, model=None, tokenizer=None) -> Path:
    """Fine-tune `model` (or the one at config.model.path) on the completions; returns the run dir."""
    check_oracle_config(config.oracle, default=SFTConfig().oracle, needs="reward")
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    start_compile_workers(device, config.learner.compile)
    if model is None:
        model, tokenizer = load_policy(config.model)
    if is_chat_source(config.data, config.messages_column):
        examples, make_batch, eval_prompts, heldout = chat_data(config, tokenizer, model)
    else:
        examples = sft_pairs(load_prompts(config.data, tokenizer, "train"), tokenizer)
        make_batch = partial(make_sft_batch, pad_token_id=tokenizer.pad_token_id)
        eval_prompts, heldout = load_prompts(config.data, tokenizer, "eval")[: config.eval.max_prompts], None
    # With LoRA, a sharded strategy (whose model cannot be copied or generated from) or vLLM, the evaluation engine
    # holds its own copy of the model and gets the (merged, gathered) weights before each evaluation, as the RL actor
    # does; otherwise it wraps the learner's current model.
    is_synced = config.lora.enabled or config.learner.strategy != "single"
    synced_engine = HFEngine(model, tokenizer, device=device) if is_synced else None
    if config.engine_backend == "vllm":  # loads --model.path itself; synced like the LoRA engine before each eval
        synced_engine = make_engine("vllm", None, tokenizer, model_path=config.model.path,
                                  tokenizer_path=config.model.tokenizer, vllm=config.vllm_engine)
    learner = Learner(apply_lora(model, config.lora), config.learner, config.num_steps, device=device)
    oracle = make_oracle(config.oracle, needs="reward")
    run_dir = open_run(config, "sft", learner.is_main)

    def make_loop(logger, bar) -> Loop:
        family = SFTFamily(
            learner=learner, examples=examples, make_batch=make_batch, batch_size=config.batch_size, oracle=oracle,
            eval_prompts=eval_prompts if learner.is_main else [], eval_config=config.eval,
            max_tokens=config.max_tokens, seed=config.seed, heldout=heldout,
            # a fresh engine on the current weights at each evaluation (the model is small next to a sync)
            eval_engine=lambda: HFEngine(learner.model, tokenizer, device=learner.device) if synced_engine is None
            else _synced(synced_engine, learner))
        return Loop(family, learner=learner, actor=None, num_iterations=config.num_steps,
                    eval_every=config.eval.every, logger=logger, run_dir=run_dir, progress=bar)

    try:
        run_loop(config, run_dir, learner, make_loop, total=config.num_steps, desc="sft")
    finally:
        oracle.close()
    return finish(config, run_dir, learner, tokenizer)


def _synced(engine, learner: Learner):
    sync_weights(learner, engine)
    return engine
