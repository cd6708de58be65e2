"""The embedded `hf` engine: determinism, sampling correctness, stops, weight sync, logprob parity."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from winnow.engines.hf import HFEngine, HFEngineConfig, _decode_rows
from winnow.learner.batch import make_train_batch
from winnow.learner.logprobs import sequence_logprobs
from winnow.types import Completion, SamplingParams


def encode(tokenizer, *texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture()
def engine(tiny_model, tiny_tokenizer):
    return HFEngine(tiny_model, tiny_tokenizer, device="cpu")


def test_shapes_and_grouping(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    out = engine.generate(prompts, SamplingParams(max_tokens=5, n=3, seed=0))
    assert len(out) == 9
    for i, c in enumerate(out):
        assert c.prompt_ids == prompts[i // 3]
        assert 1 <= len(c.response_ids) <= 5 and len(c.logprobs) == len(c.response_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    params = SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=123)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=124))
    assert [c.response_ids for c in other] != [c.response_ids for c in a]


def test_prompt_seeds_key_each_prompt_and_unseeded_calls_differ(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    sampling = dict(temperature=1.0, max_tokens=8, n=3, ignore_eos=True)
    a = engine.generate(prompts, SamplingParams(**sampling, prompt_seeds=[1, 2], seed=5))
    # prompt_seeds override seed, and a prompt's responses follow its own seed wherever it sits in the call.
    b = engine.generate(prompts, SamplingParams(**sampling, prompt_seeds=[1, 2], seed=6))
    swapped = engine.generate(prompts[::-1], SamplingParams(**sampling, prompt_seeds=[2, 1]))
    assert [c.response_ids for c in b] == [c.response_ids for c in a]
    assert [c.response_ids for c in swapped[3:] + swapped[:3]] == [c.response_ids for c in a]
    # Without any seed, each call draws a fresh one from the engine's generator.
    unseeded = [engine.generate(prompts, SamplingParams(**sampling)) for _ in range(2)]
    assert [c.response_ids for c in unseeded[0]] != [c.response_ids for c in unseeded[1]]
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        engine.generate(prompts, SamplingParams(max_tokens=2, prompt_seeds=[1]))


def test_greedy_is_deterministic_and_is_the_argmax(engine, tiny_model, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a = engine.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in engine.generate(prompts, params)]
    # Recompute by hand with full forwards (no cache, no padding): every step must be the argmax.
    for prompt, completion in zip(prompts, a):
        ids = list(prompt)
        for token in completion.response_ids:
            with torch.no_grad():
                logits = tiny_model(torch.tensor([ids])).logits[0, -1]
            assert token == int(logits.argmax())
            ids.append(token)


def test_greedy_does_not_depend_on_chunking_or_cache(tiny_model, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "1+2=", "12+34=", "345+678=", "9=")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = HFEngine(tiny_model, tiny_tokenizer, device="cpu").generate(prompts, params)
    small = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(max_batch_size=1), device="cpu")
    static = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(kv_cache="static"), device="cpu")
    for other in (small, static):
        out = other.generate(prompts, params)
        assert [c.response_ids for c in out] == [c.response_ids for c in ref]
        for x, y in zip(out, ref):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_top_k_1_equals_greedy(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    top1 = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=6, ignore_eos=True, seed=3))
    assert [c.response_ids for c in top1] == [c.response_ids for c in greedy]


def test_sampling_follows_the_tempered_distribution(engine, tiny_model, tiny_tokenizer):
    """Empirical first-token frequencies over 4000 draws match softmax(logits / T) within 3 sigma."""
    prompt = encode(tiny_tokenizer, "12+34=")[0]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt])).logits[0, -1]
    temperature, n = 0.7, 4000
    probs = torch.softmax(logits / temperature, -1)
    out = engine.generate([prompt], SamplingParams(temperature=temperature, max_tokens=1, n=n, seed=0))
    counts = torch.bincount(torch.tensor([c.response_ids[0] for c in out]), minlength=len(probs)).float()
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 3 * sigma + 1e-3).all()
    # The reported logprob is log softmax(logits / T) of the drawn token.
    first = out[0]
    assert first.logprobs[0] == pytest.approx(math.log(probs[first.response_ids[0]]), abs=1e-5)


def test_top_p_keeps_only_the_nucleus(engine, tiny_model, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, "5+7=")[0]
    with torch.no_grad():
        probs = torch.softmax(tiny_model(torch.tensor([prompt])).logits[0, -1], -1)
    sorted_probs, order = probs.sort(descending=True)
    top_p = float(sorted_probs[:2].sum()) - 1e-4  # the nucleus is exactly the two most likely tokens
    out = engine.generate([prompt], SamplingParams(top_p=top_p, max_tokens=1, n=500, seed=0))
    assert {c.response_ids[0] for c in out} == set(order[:2].tolist())


def test_stop_tokens_and_strings(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=")
    plus = tiny_tokenizer.convert_tokens_to_ids("+")
    # Draw many samples so some hit the stop token "+".
    out = engine.generate(prompts, SamplingParams(max_tokens=8, n=64, seed=0, stop_token_ids=[plus], ignore_eos=True))
    stopped = [c for c in out if c.finish_reason == "stop"]
    assert stopped, "expected some responses to hit the stop token"
    for c in stopped:
        assert c.response_ids[-1] == plus and plus not in c.response_ids[:-1]
    for c in out:
        if c.finish_reason == "length":
            assert len(c.response_ids) == 8 and plus not in c.response_ids
    strings = engine.generate(prompts, SamplingParams(max_tokens=8, n=64, seed=0, stop=["1"], ignore_eos=True))
    for c in strings:
        assert "1" not in c.text
        if c.finish_reason == "stop":
            assert tiny_tokenizer.decode(c.response_ids).endswith("1")


def test_eos_ends_a_response_unless_ignored(engine, tiny_tokenizer):
    prompts = encode(tiny_tokenizer, "12+34=")
    eos = tiny_tokenizer.eos_token_id
    out = engine.generate(prompts, SamplingParams(max_tokens=10, n=64, seed=1))
    assert any(c.response_ids[-1] == eos and c.finish_reason == "stop" for c in out)
    for c in out:
        assert eos not in c.response_ids[:-1]
        assert "<eos>" not in c.text
    ignored = engine.generate(prompts, SamplingParams(max_tokens=10, n=64, seed=1, ignore_eos=True))
    assert all(len(c.response_ids) == 10 and c.finish_reason == "length" for c in ignored)


def test_update_weights_changes_outputs_to_the_new_models(tiny_tokenizer):
    from winnow.data.tiny import build_tiny_model

    a, b = build_tiny_model(tiny_tokenizer, seed=0), build_tiny_model(tiny_tokenizer, seed=1)
    prompts = encode(tiny_tokenizer, "12+34=", "7+8=")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = HFEngine(a, tiny_tokenizer, device="cpu")
    expected_b = HFEngine(b, tiny_tokenizer, device="cpu").generate(prompts, params)
    before = engine.generate(prompts, params)
    engine.update_weights(b.named_parameters())
    after = engine.generate(prompts, params)
    for x, y in zip(after, expected_b):
        assert x.response_ids == y.response_ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-6)
    assert [c.logprobs for c in before] != [c.logprobs for c in after]
    assert engine.last_sync_seconds > 0
    with pytest.raises(KeyError, match="no parameter"):
        engine.update_weights([("not.a.weight", torch.zeros(1))])
    with pytest.raises(KeyError, match="stale"):
        engine.update_weights(list(b.named_parameters())[:1])


@pytest.mark.parametrize("temperature,top_k", [(1.0, -1), (0.7, -1), (1.0, 4)])
def test_engine_logprobs_match_learner_recomputation(engine, tiny_model, tiny_tokenizer, temperature, top_k):
    """Prompts of different lengths (left-padded in the engine, right-padded in the learner)."""
    prompts = encode(tiny_tokenizer, "1+2=", "12+34=", "345+678=")
    params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=8, n=4, seed=7)
    out = engine.generate(prompts, params)
    batch = make_train_batch(out, torch.zeros(len(out)), pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        learner = sequence_logprobs(tiny_model, batch, temperature=temperature)
    mask = batch.response_mask.bool()
    assert mask.sum() == sum(c.num_tokens for c in out)
    torch.testing.assert_close(learner[mask], batch.engine_logprobs[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n=0"),
    ],
)
def test_out_of_range_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3, 4], []], SamplingParams(max_tokens=2))


def _completions_row_by_row(tokenizer, prompts, tokens, logprobs, lengths, is_done, params) -> list[Completion]:
    """The engine's completions built one row at a time (its earlier code): what the batched build must equal."""
    out = []
    for row, prompt_ids in enumerate(prompts):
        n = int(lengths[row])
        ids = tokens[row, :n].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for stop in params.stop:
            if (cut := text.find(stop)) >= 0:
                text = text[:cut]
        out.append(Completion(list(prompt_ids), ids, logprobs[row, :n].tolist(),
                              "stop" if bool(is_done[row]) else "length", text))
    return out


def test_completions_of_a_decode_batch(engine, tiny_tokenizer):
    """Rows of every length (full, short with EOS, empty, cut by a stop string) come back as the row-by-row build
    made them: the same ids, texts, and logprobs as the same float32 values."""
    ids = tiny_tokenizer.convert_tokens_to_ids
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    rows = [[ids(c) for c in "12+34="], [ids("3"), eos, pad, pad, pad, pad], [pad] * 6,
            [ids(c) for c in "0==1"] + [pad, pad]]
    tokens = torch.tensor(rows)  # [4, 6]
    logprobs = -torch.arange(1, 25, dtype=torch.float32).reshape(4, 6) / 10  # -0.1 ... -2.4, none exact in float32
    lengths, is_done = torch.tensor([6, 2, 0, 4]), torch.tensor([False, True, True, False])
    prompts = [[ids("1")], [ids("2"), ids("+")], [ids("3")], [ids("4")]]
    params = SamplingParams(max_tokens=6, stop=["+", "=="])
    out = engine._completions(prompts, tokens, logprobs, lengths, is_done, params)
    # "12+34=" cut at "+"; "3" then EOS (a special token: not in the text); nothing; "0==1" cut at "==".
    assert [c.text for c in out] == ["12", "3", "", "0"]
    assert [c.response_ids for c in out] == [rows[0], rows[1][:2], [], rows[3][:4]]
    assert [c.finish_reason for c in out] == ["length", "stop", "stop", "length"]
    assert out[1].logprobs == [float(torch.tensor(-0.7)), float(torch.tensor(-0.8))]  # rounded to float32
    assert [c.prompt_ids for c in out] == prompts and out[0].prompt_ids is not prompts[0]
    assert out == _completions_row_by_row(tiny_tokenizer, prompts, tokens, logprobs, lengths, is_done, params)


def test_decode_rows_honours_a_tokenizer_that_changes_decode(tiny_tokenizer):
    """The batched Rust decode stands in for `decode` only where transformers adds nothing to it: a subclass's own
    `_decode`, or space clean-up, still decides the text."""

    class Bracketed(type(tiny_tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "<" + super()._decode(token_ids, **kwargs) + ">"

    rows = [[7, 8, 1], [], [9]]
    assert _decode_rows(tiny_tokenizer, rows) == ["12", "", "3"]
    bracketed = copy.copy(tiny_tokenizer)
    bracketed.__class__ = Bracketed
    assert _decode_rows(bracketed, rows) == ["<12>", "<>", "<3>"]
    cleaned = copy.copy(tiny_tokenizer)
    cleaned.clean_up_tokenization_spaces = True
    assert _decode_rows(cleaned, rows) == [cleaned.decode(row, skip_special_tokens=True) for row in rows]
