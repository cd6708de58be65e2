"""`winnow init-model`: a tokenizer trained on a task's text and a small model that `--model.path` loads."""
from __future__ import annotations

import pytest

from winnow.cli import main
from winnow.data import DataConfig, load_prompts
from winnow.setup import ModelConfig, load_policy


def test_init_model_from_a_task_loads_with_model_path(tmp_path):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "chain_sum"
    main(["init-model", "--data.train", "reasoning_gym:chain_sum", "--data.num-train-prompts", "50",
          "--data.task-options", '{"max_terms": 2}', "--output-dir", str(out), "--size", "tiny"])
    model, tokenizer = load_policy(ModelConfig(path=str(out)))
    prompts = load_prompts(DataConfig(train="reasoning_gym:chain_sum", num_train_prompts=50,
                                      task_options='{"max_terms": 2}'), tokenizer, "train")
    for p in prompts:  # every character of the task has its own id: text round-trips, nothing is <unk>
        assert tokenizer.decode(p.token_ids) == p.text and tokenizer.unk_token_id not in p.token_ids
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 128
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.6e6
    # role markers are one token each, and the chat template renders a conversation
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1 + 2 ="}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>1 + 2 =<|assistant|>"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1 + 7 + 1


def test_init_model_small_from_chat_data(tmp_path):
    main(["init-model", "--data.train", "dialogue", "--output-dir", str(tmp_path / "m"), "--size", "small"])
    model, tokenizer = load_policy(ModelConfig(path=str(tmp_path / "m")))
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256
    assert set("0123456789+=") <= set(tokenizer.get_vocab())
