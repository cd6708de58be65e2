"""Multi-turn chat SFT: the assistant mask token by token, packing equals unpacked, row errors, and the built-in
two-round dialogue task learned end to end (its second-turn answers become right)."""
from __future__ import annotations

import json

import pytest
import torch

from winnow.algorithms.sft import sft_loss
from winnow.data import DataConfig
from winnow.data.chat import (
    DialogueTask,
    add_chat_template,
    check_conversation,
    has_generation_markers,
    load_conversations,
    render_conversation,
)
from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
from winnow.learner.batch import make_chat_batch
from winnow.learner.logprobs import sequence_logprobs

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"  # (a newline after a tag is trimmed)
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "+4="},
    {"role": "assistant", "content": "7 ok"},
]


def chat_tokenizer(template: str):
    """A character tokenizer with both templates' markers as single special tokens."""
    tokenizer = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz0123456789+= \n"])
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = template
    return tokenizer


def expected(tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Ids and mask built piece by piece (a character tokenizer: the pieces' tokens concatenate)."""
    ids, mask = [], []
    for text, is_assistant in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [is_assistant] * len(piece)
    return ids, mask


CHATML_PIECES = [
    ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n", 0),
    ("3<|im_end|>", 1),
    ("\n<|im_start|>user\n+4=<|im_end|>\n<|im_start|>assistant\n", 0),
    ("7 ok<|im_end|>", 1),
    ("\n", 0),
]
LLAMA3_PIECES = [
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n1+2=<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
    ("3<|eot_id|>", 1),
    ("<|start_header_id|>user<|end_header_id|>\n\n+4=<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0),
    ("7 ok<|eot_id|>", 1),
]


@pytest.mark.parametrize("template,pieces,marked", [
    (CHATML, CHATML_PIECES, False), (CHATML_GENERATION, CHATML_PIECES, True),
    (LLAMA3, LLAMA3_PIECES, False), (LLAMA3_GENERATION, LLAMA3_PIECES, True),
], ids=["chatml", "chatml-generation", "llama3", "llama3-generation"])
def test_assistant_mask_token_by_token(template, pieces, marked):
    tokenizer = chat_tokenizer(template)
    assert has_generation_markers(tokenizer) is marked
    ids, mask = render_conversation(CONVERSATION, tokenizer)
    want_ids, want_mask = expected(tokenizer, pieces)
    assert ids == want_ids
    assert mask == want_mask  # every token: the assistant's text and its end-of-turn token, nothing else
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == pieces[1][0] + pieces[3][0]
    # the last turn only: the first assistant turn becomes context
    _, last = render_conversation(CONVERSATION, tokenizer, last_only=True)
    _, want_last = expected(tokenizer, [(text, is_assistant * (k == 3)) for k, (text, is_assistant) in enumerate(pieces)])
    assert last == want_last


def test_non_incremental_template_is_refused():
    # A template that writes the number of turns first: a prefix does not render to a prefix of the whole.
    tokenizer = chat_tokenizer("{{ messages | length }}" + CHATML)
    with pytest.raises(ValueError, match="does not render incrementally.*generation"):
        render_conversation(CONVERSATION, tokenizer)


@pytest.mark.parametrize("messages,problem", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "turn 1: unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "turn 0: content is int"),
])
def test_row_errors_name_the_row_and_problem(tmp_path, messages, problem):
    path = tmp_path / "chat.jsonl"
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [good, good, messages]))
    with pytest.raises(ValueError, match=f"chat.jsonl, row 2.*{problem}"):
        load_conversations(DataConfig(train=str(path), eval_fraction=0.0), "messages", "train")
    with pytest.raises(ValueError, match="no messages column 'conversation'.*--messages-column"):
        load_conversations(DataConfig(train=str(path)), "conversation", "train")
    assert check_conversation(good, "x") == good


def test_packing_gives_the_unpacked_loss_and_gradients():
    tokenizer = add_chat_template(train_char_tokenizer(DialogueTask().texts()))
    model = build_tiny_model(tokenizer, seed=0)
    examples = [render_conversation(m, tokenizer) for m in DialogueTask(num_train=12).conversations("train")]
    # varied lengths: drop the last turn of every third conversation
    examples = [(ids[: len(ids) - 4 * (k % 3 == 0)], mask[: len(ids) - 4 * (k % 3 == 0)])
                for k, (ids, mask) in enumerate(examples)]

    def loss_and_grad(batch):
        model.zero_grad()
        logprobs = sequence_logprobs(model, batch)
        loss, _ = sft_loss(logprobs, batch, num_sequences=batch.batch_size, num_tokens=batch.num_response_tokens)
        loss.backward()
        return float(loss.detach()), model.model.embed_tokens.weight.grad.clone()

    unpacked = make_chat_batch(examples, tokenizer.pad_token_id)
    packed = make_chat_batch(examples, tokenizer.pad_token_id, pack_length=64)
    assert unpacked.batch_size == 12 and packed.batch_size < 12
    assert packed.num_response_tokens == unpacked.num_response_tokens
    loss_unpacked, grad_unpacked = loss_and_grad(unpacked)
    loss_packed, grad_packed = loss_and_grad(packed)
    assert loss_packed == pytest.approx(loss_unpacked, abs=1e-5)
    torch.testing.assert_close(grad_packed, grad_unpacked, atol=1e-6, rtol=1e-4)
    # without the restarted positions, conversations would see each other and the loss would differ
    packed.position_ids = None
    assert abs(loss_and_grad(packed)[0] - loss_unpacked) > 1e-3


@pytest.mark.slow
def test_dialogue_sft_learns_the_second_turn(tmp_path):
    """`winnow sft --data.train dialogue`: the held-out second-turn answers (which need the first turn's answer)
    go from 0% to most of them right; held-out loss and assistant-token accuracy are logged as it goes."""
    from winnow.learner.learner import LearnerConfig
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.config import EvalConfig
    from winnow.oracles import OracleConfig, RuleOracleConfig
    from winnow.recipes.sft import SFTConfig, train_sft
    from winnow.setup import ModelConfig

    tokenizer = add_chat_template(train_char_tokenizer(DialogueTask().texts()))
    init = save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "init")
    run = train_sft(SFTConfig(
        model=ModelConfig(path=str(init)), data=DataConfig(train="dialogue"), oracle=OracleConfig(rule=RuleOracleConfig(rewards=["exact"])),
        learner=LearnerConfig(lr=3e-3, warmup_steps=10, lr_schedule="constant", micro_batch_size=64),
        eval=EvalConfig(every=0, k=0, max_prompts=64), batch_size=64, num_steps=160, max_tokens=4,
        max_seq_tokens=128, logging=LoggingConfig(progress=False), output_dir=str(tmp_path), device="cpu",
        num_threads=1, save_final=False))
    evals = [r for r in read_metrics(run) if "eval/heldout_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["eval/greedy_accuracy"] == 0.0 and last["eval/greedy_accuracy"] >= 0.5
    assert last["eval/heldout_loss"] < first["eval/heldout_loss"] / 5
    assert last["eval/assistant_token_accuracy"] > 0.8
    rows = [r for r in read_metrics(run) if "data/fill" in r]
    assert rows[-1]["counts/samples"] == 160 * 64 and rows[-1]["data/fill"] > 0.8  # packed rows are mostly tokens


def test_chat_sft_with_lora_trains_adapters_only(tmp_path):
    pytest.importorskip("peft")
    from winnow.learner.learner import LearnerConfig
    from winnow.learner.lora import LoraConfig
    from winnow.logging import LoggingConfig, read_metrics
    from winnow.loops.config import EvalConfig
    from winnow.recipes.sft import SFTConfig, train_sft
    from winnow.setup import ModelConfig

    tokenizer = add_chat_template(train_char_tokenizer(DialogueTask().texts()))
    init = save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "init")
    run = train_sft(SFTConfig(
        model=ModelConfig(path=str(init)), data=DataConfig(train="dialogue", num_train_prompts=64),
        lora=LoraConfig(rank=8), learner=LearnerConfig(lr=1e-2, warmup_steps=0, micro_batch_size=64),
        eval=EvalConfig(every=0, k=0, max_prompts=8), batch_size=32, num_steps=4, max_tokens=4, max_seq_tokens=128,
        logging=LoggingConfig(progress=False), output_dir=str(tmp_path), device="cpu", num_threads=1))
    rows = [r for r in read_metrics(run) if "eval/heldout_loss" in r]
    # the adapters lowered the held-out loss; the engine generated with the merged weights (synced before eval)
    assert rows[-1]["eval/heldout_loss"] < rows[0]["eval/heldout_loss"]
    assert "eval/greedy_accuracy" in rows[-1]


@pytest.mark.slow
def test_chat_sft_under_torchrun_shards_rows_and_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m winnow.cli sft --learner.strategy fsdp2` (gloo, CPU) on the dialogue task:
    each rank trains its half of every packed batch (the target tokens trained, summed over the ranks, are the
    batch's, not twice them), the losses and gradient norms are the single process's, and rank 0 alone writes
    the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from winnow.logging import read_metrics

    root = Path(__file__).resolve().parents[1]
    tokenizer = add_chat_template(train_char_tokenizer(DialogueTask().texts()))
    init = save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "init")
    flags = ["sft", "--model.path", str(init), "--data.train", "dialogue", "--data.num-train-prompts", "64",
             "--batch-size", "16", "--num-steps", "3", "--max-seq-tokens", "128", "--learner.lr", "3e-3",
             "--learner.micro-batch-size", "4", "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "4",
             "--max-tokens", "4", "--device", "cpu", "--num-threads", "1", "--logging.no-progress",
             "--output-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "winnow.cli", *flags, "--run-name", "single"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "winnow.cli",
         *flags, "--run-name", "fsdp2", "--learner.strategy", "fsdp2"], env=env, capture_output=True, text=True,
        timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert sharded.stdout.count("run written to") == 1
    want, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp2")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for w, g in zip(want[1:], got[1:]):
        assert w["data/rows"] >= 2 and g["data/rows"] == w["data/rows"]  # the same packed batch on both
        assert g["train/target_tokens"] == w["train/target_tokens"]
        assert g["train/loss"] == pytest.approx(w["train/loss"], rel=1e-5)
        assert g["train/grad_norm"] == pytest.approx(w["train/grad_norm"], rel=1e-4)
    assert sum(r["train/target_tokens"] for r in got[1:]) == got[3]["counts/target_tokens"]  # each token once
    assert want[3]["train/loss"] < want[1]["train/loss"]  # the steps moved the weights
    assert got[3]["eval/heldout_loss"] == pytest.approx(want[3]["eval/heldout_loss"], rel=1e-5)
    assert (tmp_path / "fsdp2" / "final" / "model.safetensors").exists()
