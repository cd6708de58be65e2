"""reasoning-gym as a prompt source (`--data.train reasoning_gym:NAME`) and the builtin `reasoning_gym` reward."""
from __future__ import annotations

import pytest

pytest.importorskip("reasoning_gym")

from winnow.data import DataConfig, load_prompts  # noqa: E402
from winnow.data.tiny import train_char_tokenizer  # noqa: E402
from winnow.oracles import OracleConfig, RuleOracleConfig, make_oracle  # noqa: E402
from winnow.oracles.rules import final_answer  # noqa: E402

OPTIONS = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer([""], include_all_bytes=True)


def config(**overrides) -> DataConfig:
    return DataConfig(**{"train": "reasoning_gym:chain_sum", "num_train_prompts": 40, "max_eval_prompts": 20,
                         "task_options": OPTIONS, "seed": 3, **overrides})


def test_source_generates_seeded_disjoint_splits(tokenizer):
    train = load_prompts(config(), tokenizer, "train")
    held_out = load_prompts(config(), tokenizer, "eval")
    assert len(train) == 40 and 0 < len(held_out) <= 20
    assert not {p.text for p in train} & {p.text for p in held_out}  # held out: never trained on
    assert [p.text for p in load_prompts(config(), tokenizer, "train")] == [p.text for p in train]  # seeded
    assert [p.text for p in load_prompts(config(seed=4), tokenizer, "train")] != [p.text for p in train]
    first = train[0]
    # "a + b =" or "a - b =" with one-digit operands (the options reached the generator), answer its value
    expression = first.text.rsplit(":", 1)[1].strip().removesuffix("=")
    assert first.reference == str(eval(expression)) and len(expression.split()) == 3
    assert "reasoning_gym_entry" in first.columns


def test_reward_calls_the_tasks_scorer(tokenizer):
    prompts = load_prompts(config(), tokenizer, "eval")[:3]
    oracle = make_oracle(OracleConfig(rule=RuleOracleConfig(rewards=["reasoning_gym"])), needs="reward")
    try:
        right = [p.reference for p in prompts]
        completions = [right[0], f"<think>easy</think> <answer>{right[1]}</answer>", str(int(right[2]) + 1)]
        columns = {"reasoning_gym_entry": [p.columns["reasoning_gym_entry"] for p in prompts]}
        result = oracle.reward([p.text for p in prompts], completions, right, columns)
        assert result.scores == [1.0, 1.0, 0.0] and result.components["reasoning_gym"] == [1.0, 1.0, 0.0]
        with pytest.raises(ValueError, match="needs the 'reasoning_gym_entry' column"):
            oracle.reward(["q"], ["1"], ["1"], {})
    finally:
        oracle.close()
    assert final_answer("so \\boxed{12}") == "12" and final_answer(" 7 ") == "7"


def test_bad_task_and_options_name_the_flag(tokenizer):
    with pytest.raises(ValueError, match="--data.task-options"):
        load_prompts(config(task_options="{max_terms: 2}"), tokenizer, "train")
    with pytest.raises(ValueError, match="reasoning_gym:NAME"):
        load_prompts(config(train="reasoning_gym:no_such_task", task_options=None), tokenizer, "train")
