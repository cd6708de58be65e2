"""winnow.data: templates, dataset loading and its errors, the arithmetic task, tiny models, batching."""
from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from winnow.data import (
    ArithmeticTask,
    DataConfig,
    PromptSampler,
    apply_template,
    batches,
    build_tiny_model,
    load_prompts,
    make_task,
    save_tiny,
    train_char_tokenizer,
)
from winnow.data.templates import QWEN_MATH_TEMPLATE, R1_TEMPLATE

ROWS = [
    {"question": "1+1=", "solution": 2, "level": "easy"},
    {"question": "2+3=", "solution": 5, "level": "easy"},
    {"question": "10*10=", "solution": 100, "level": "hard"},
    {"question": "7-9=", "solution": -2, "level": "hard"},
]
COLUMNS = {"prompt_column": "question", "answer_column": "solution"}


@pytest.fixture(scope="module")
def tokenizer():
    # all 256 bytes: the templates' letters and tags tokenize without <unk>
    return train_char_tokenizer(["0123456789+-*="], include_all_bytes=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(train, **kwargs) -> DataConfig:
    return DataConfig(train=str(train), eval_fraction=0.0, **{**COLUMNS, **kwargs})


# --- loading each format, with custom column names ---------------------------------------------------


def check_rows(prompts, tokenizer):
    assert [p.text for p in prompts] == [r["question"] for r in ROWS]
    assert [p.reference for p in prompts] == ["2", "5", "100", "-2"]  # str() of the answer column
    assert [p.columns for p in prompts] == [{"level": r["level"]} for r in ROWS]
    assert [p.index for p in prompts] == [0, 1, 2, 3]
    # tokenized without special tokens: no BOS, no EOS
    assert prompts[2].token_ids == tokenizer("10*10=", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompts[2].token_ids) == "10*10="


def test_load_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    check_rows(load_prompts(config(path), tokenizer), tokenizer)


def test_load_json_array(tmp_path, tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))
    check_rows(load_prompts(config(path), tokenizer), tokenizer)


def test_load_parquet(tmp_path, tokenizer):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    check_rows(load_prompts(config(path), tokenizer), tokenizer)


def test_load_save_to_disk_dataset(tmp_path, tokenizer):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    check_rows(load_prompts(config(tmp_path / "ds"), tokenizer), tokenizer)


def test_load_save_to_disk_dataset_dict_picks_splits(tmp_path, tokenizer):
    test_rows = [{"question": "9+9=", "solution": 18, "level": "easy"}]
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(test_rows)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(train=str(tmp_path / "dd"), **COLUMNS)  # eval None: the DatasetDict's "test" split
    check_rows(load_prompts(cfg, tokenizer, "train"), tokenizer)  # nothing held out of train
    assert [p.text for p in load_prompts(cfg, tokenizer, "eval")] == ["9+9="]
    cfg = DataConfig(train=str(tmp_path / "dd"), split="test", **COLUMNS)
    assert [p.reference for p in load_prompts(cfg, tokenizer, "train")] == ["18"]
    with pytest.raises(ValueError, match=r"splits train, test but no 'validation'; set --data.split"):
        load_prompts(DataConfig(train=str(tmp_path / "dd"), split="validation", **COLUMNS), tokenizer)


def test_answer_column_none_and_null_answers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "answer": None}, {"prompt": "b", "answer": 3}])
    prompts = load_prompts(DataConfig(train=str(path), eval_fraction=0.0), tokenizer)
    assert [p.reference for p in prompts] == [None, "3"]  # a null answer stays None, never "None"
    prompts = load_prompts(DataConfig(train=str(path), eval_fraction=0.0, answer_column=None), tokenizer)
    assert [p.reference for p in prompts] == [None, None]
    assert prompts[1].columns == {"answer": 3}  # not the answer column any more: passed through


def test_file_without_eval_holds_out_a_fraction(tmp_path, tokenizer):
    rows = [{"prompt": f"{i}+{i}=", "answer": 2 * i} for i in range(100)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = DataConfig(train=str(path), eval_fraction=0.1, seed=3)
    train, held_out = load_prompts(cfg, tokenizer, "train"), load_prompts(cfg, tokenizer, "eval")
    assert (len(train), len(held_out)) == (90, 10)
    assert sorted(p.index for p in train + held_out) == list(range(100))  # disjoint, nothing lost
    assert [p.index for p in load_prompts(cfg, tokenizer, "eval")] == [p.index for p in held_out]
    capped = DataConfig(train=str(path), eval_fraction=0.1, max_eval_prompts=4)
    assert len(load_prompts(capped, tokenizer, "train")) == 96  # only the 4 evaluated rows leave train
    cfg = DataConfig(train=str(path), eval=str(path), num_train_prompts=30, max_eval_prompts=5)
    assert (len(load_prompts(cfg, tokenizer, "train")), len(load_prompts(cfg, tokenizer, "eval"))) == (30, 5)


def test_chat_message_prompts_need_the_tokenizer_template(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": "2"}])
    tokenizer = train_char_tokenizer(["x"], include_all_bytes=True)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    prompts = load_prompts(DataConfig(train=str(path), template="tokenizer", eval_fraction=0.0), tokenizer)
    assert prompts[0].text == "[system]be brief[user]1+1=[assistant]"
    with pytest.raises(ValueError, match=r"row 0.*only --data.template tokenizer can render"):
        load_prompts(DataConfig(train=str(path), eval_fraction=0.0), tokenizer)


# --- templates ----------------------------------------------------------------------------------------


def test_templates_render(tokenizer):
    assert apply_template("none", "12+34=") == "12+34="
    r1 = apply_template("r1", "12+34=")
    assert r1 == R1_TEMPLATE.format(question="12+34=")
    assert r1.startswith("A conversation between User and Assistant. The User asks a question")
    assert r1.endswith("<think> reasoning process here </think> <answer> answer here </answer>. "
                       "User: 12+34=\nAssistant: <think>")
    assert apply_template("qwen_math", "12+34=") == QWEN_MATH_TEMPLATE.format(question="12+34=") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_template():
    tokenizer = train_char_tokenizer(["x"], include_all_bytes=True)
    with pytest.raises(ValueError, match=r"has no chat template; use --data.template none .*r1 or qwen_math"):
        apply_template("tokenizer", "hi", tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert apply_template("tokenizer", "12+34=", tokenizer) == "<user>12+34=<assistant>"


def test_unknown_template_lists_valid_ones(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"unknown template 'chatml'; valid templates: none, qwen_math, r1"):
        apply_template("chatml", "q")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"--data.template"):
        load_prompts(DataConfig(train=str(path), template="chatml"), tokenizer)


def test_template_applied_before_tokenizing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    cfg = DataConfig(train=str(path), template="r1", eval_fraction=0.0)
    (prompt,) = load_prompts(cfg, tokenizer)
    assert prompt.text == R1_TEMPLATE.format(question="1+1=")
    assert tokenizer.decode(prompt.token_ids) == prompt.text


# --- errors that name the problem and the fix ------------------------------------------------------------


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl' not found.*built-in task \(arithmetic"):
        load_prompts(DataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer)


def test_unknown_format(tmp_path, tokenizer):
    (tmp_path / "data.csv").write_text("prompt,answer\n1+1=,2\n")
    with pytest.raises(ValueError, match=r"data.csv: unsupported format '.csv'; use .jsonl, .json, .parquet"):
        load_prompts(DataConfig(train=str(tmp_path / "data.csv")), tokenizer)


def test_directory_not_saved_by_datasets(tmp_path, tokenizer):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match=r"not one written by datasets.save_to_disk"):
        load_prompts(DataConfig(train=str(tmp_path / "stuff")), tokenizer)


def test_missing_columns_list_the_columns_and_the_flag(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no prompt column 'prompt' \(columns: question, solution, level\); "
                                         r"set --data.prompt-column"):
        load_prompts(DataConfig(train=str(path)), tokenizer)
    with pytest.raises(ValueError, match=r"no answer column 'answer' \(columns: question, solution, level\); "
                                         r"set --data.answer-column .* or to None"):
        load_prompts(DataConfig(train=str(path), prompt_column="question"), tokenizer)


@pytest.mark.parametrize("bad", [None, "", "   ", 7, [1, 2]])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_row_names_row_and_file(tmp_path, tokenizer, bad, suffix):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": bad, "answer": "3"}]
    path = write_jsonl(tmp_path / f"data{suffix}", rows)
    with pytest.raises(ValueError, match=r"row 1: prompt column 'prompt' is .* must be a non-empty string") as e:
        load_prompts(DataConfig(train=str(path), eval_fraction=0.0), tokenizer)
    assert str(path) in str(e.value)


def test_bad_json_line_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"\n')
    with pytest.raises(ValueError, match=r"data.jsonl: line 2 is not valid JSON"):
        load_prompts(DataConfig(train=str(path)), tokenizer)
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "1+1=", "answer": "2"},\n  {"prompt": "2+2=" "answer": "4"}\n]\n')
    with pytest.raises(ValueError, match=r"data.json: not valid JSON at line 3, column"):
        load_prompts(DataConfig(train=str(path)), tokenizer)


def test_long_prompts_dropped_and_counted(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "1" * n, "answer": "x"} for n in (3, 20, 5, 30)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="winnow.data.prompts"):
        prompts = load_prompts(DataConfig(train=str(path), max_prompt_tokens=10, eval_fraction=0.0), tokenizer)
    assert [p.index for p in prompts] == [0, 2]
    assert "dropped 2 of 4 prompts" in caplog.text and "row 3, 30 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"all 4 prompts .* longer than max_prompt_tokens=2"):
        load_prompts(DataConfig(train=str(path), max_prompt_tokens=2, eval_fraction=0.0), tokenizer)


# --- the arithmetic task ---------------------------------------------------------------------------------


def test_arithmetic_is_deterministic_disjoint_and_correct():
    task = ArithmeticTask(num_digits=2, ops="+-*", seed=0, num_train=3000, num_eval=200)
    train, held_out = task.examples("train"), task.examples("eval")
    assert (len(train), len(held_out)) == (3000, 200)
    assert len({q for q, _ in train}) == 3000  # no repeats
    assert not {q for q, _ in train} & {q for q, _ in held_out}
    assert train == ArithmeticTask(num_digits=2, ops="+-*", seed=0, num_train=3000).examples("train")
    assert train != ArithmeticTask(num_digits=2, ops="+-*", seed=1, num_train=3000).examples("train")
    for question, answer in train + held_out:
        assert " " not in question and question.endswith("=")
        assert eval(question[:-1]) == int(answer) and answer == str(int(answer))
        a, b = question[:-1].replace("-", "+").replace("*", "+").split("+")
        assert len(a) == len(b) == 2
    # the held-out set depends on the seed alone, not on the sizes asked for
    bigger = ArithmeticTask(num_digits=2, ops="+-*", seed=0, num_train=5000, num_eval=400)
    assert not {q for q, _ in bigger.examples("train")} & {q for q, _ in held_out}
    assert set(held_out) < set(bigger.examples("eval"))


def test_arithmetic_large_space_and_limits(tmp_path):
    task = make_task("arithmetic-3digit", seed=0, num_train=500, num_eval=50)  # sampled, not enumerated
    train, held_out = task.examples("train"), task.examples("eval")
    assert not {q for q, _ in train} & {q for q, _ in held_out}
    assert all(eval(q[:-1]) == int(a) for q, a in train) and len(train[0][0]) == len("123+456=")
    assert ArithmeticTask.answer("12+34=") == "46" and ArithmeticTask.answer("12-34=") == "-22"
    with pytest.raises(ValueError, match=r"cannot draw 200 distinct eval questions"):
        ArithmeticTask(num_digits=1, num_train=10, num_eval=200).examples("eval")
    with pytest.raises(ValueError, match=r"unknown task 'algebra'; built-in tasks: arithmetic"):
        make_task("algebra")


def test_arithmetic_sft_examples_and_jsonl(tmp_path, tokenizer):
    task = make_task("arithmetic", num_train=100, num_eval=20)
    assert task.sft_examples(10) == task.examples("train")[:10]
    path = task.to_jsonl(tmp_path / "train.jsonl")
    assert json.loads(path.read_text().splitlines()[0]) == dict(zip(("prompt", "answer"), task.examples("train")[0]))
    from_file = load_prompts(DataConfig(train=str(path), eval_fraction=0.0), tokenizer)
    builtin = load_prompts(DataConfig(num_train_prompts=100, max_eval_prompts=20), tokenizer)
    assert [(p.text, p.reference) for p in from_file] == [(p.text, p.reference) for p in builtin]
    held_out = load_prompts(DataConfig(num_train_prompts=100, max_eval_prompts=20), tokenizer, "eval")
    assert [(p.text, p.reference) for p in held_out] == task.examples("eval")


# --- the character tokenizer and the tiny model ----------------------------------------------------------


def test_char_tokenizer_round_trip_and_ids():
    tokenizer = train_char_tokenizer(["12+34=46", "99-5=94 \n"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    ids = tokenizer("12+34=46", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and tokenizer.decode(ids) == "12+34=46"  # one id per character, no spaces inserted
    assert tokenizer.decode(tokenizer("9 -\n1")["input_ids"]) == "9 -\n1"
    assert tokenizer.decode(ids + [1, 0], skip_special_tokens=True) == "12+34=46"
    assert tokenizer.convert_ids_to_tokens(tokenizer("7")["input_ids"]) == ["<unk>"]  # unseen character
    shuffled = ["99-5=94 \n", "12+34=46"]
    assert train_char_tokenizer(shuffled).get_vocab() == tokenizer.get_vocab()


def test_saved_tokenizer_loads_identically_both_ways(tmp_path):
    # ENVIRONMENT.md pitfall: AutoTokenizer on a qwen2 folder builds a Qwen2Tokenizer (digit-splitting regex,
    # byte-level); the tokenizer is built so that this gives the same ids, spaces and newlines included.
    tokenizer = train_char_tokenizer(["0123456789+-*= \nabcxyz"])
    save_tiny(build_tiny_model(tokenizer), tokenizer, tmp_path)
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in ["12+34=46", "123456 * 7 = 864192\nabc", "  x  y\n\nz"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert auto.decode(ids) == fast.decode(ids) == text
    assert (auto.pad_token_id, auto.eos_token_id) == (fast.pad_token_id, fast.eos_token_id) == (0, 1)


def test_tiny_model_builds_and_runs():
    tokenizer = train_char_tokenizer(["0123456789+="])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = build_tiny_model(tokenizer, seed=0)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone
    config = model.config
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM CPU needs head_dim 64
    assert config.tie_word_embeddings and (config.eos_token_id, config.pad_token_id) == (1, 0)
    assert next(model.parameters()).dtype == torch.float32
    assert 400_000 < sum(p.numel() for p in model.parameters()) < 600_000
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]] * 3)  # [B=3, T=8]
    assert model(ids).logits.shape == (3, 8, len(tokenizer))
    same = build_tiny_model(tokenizer, seed=0)
    other = build_tiny_model(tokenizer, seed=1, num_layers=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters()))
    assert other.config.num_hidden_layers == 1
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_tiny_save_load_identical_logits(tmp_path):
    tokenizer = train_char_tokenizer(["0123456789+="])
    model = build_tiny_model(tokenizer, seed=0).eval()
    save_tiny(model, tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.generation_config.eos_token_id == 1 and loaded.generation_config.pad_token_id == 0


# --- batching -------------------------------------------------------------------------------------------


def test_batches_reproducible_and_epoch_complete():
    items = list(range(10))
    first = [next(it) for it in [batches(items, 4, seed=0)] for _ in range(5)]
    again = [next(it) for it in [batches(items, 4, seed=0)] for _ in range(5)]
    other = [next(it) for it in [batches(items, 4, seed=1)] for _ in range(5)]
    assert first == again and first != other
    flat = [x for batch in first for x in batch]  # 20 items: two whole epochs, the 3rd batch straddling
    assert sorted(flat[:10]) == items and sorted(flat[10:]) == items and flat[:10] != flat[10:]
    assert [len(b) for b in first] == [4] * 5


def test_sampler_resumes_and_handles_big_batches():
    sampler = PromptSampler(list("abcdefg"), batch_size=3, seed=5)
    for _ in range(4):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(3)]
    resumed = PromptSampler(list("abcdefg"), batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(3)] == expected and resumed.epoch == sampler.epoch == 3
    with pytest.raises(ValueError, match=r"data or its config changed"):
        PromptSampler(list("abc"), batch_size=3, seed=5).load_state_dict(state)
    big = next(PromptSampler([1, 2], batch_size=5, seed=0))  # batch larger than the data: whole epochs
    assert len(big) == 5 and sorted(big[:2]) == sorted(big[2:4]) == [1, 2]
