"""winnow's fixed-shape decode step (`decode="static"`, the eager form of the GPU's CUDA-graph path).

It replaces the transformers forward during decode, so it must compute the same thing: greedy tokens and
logprobs equal to the `hf` path's on Llama, Qwen2 and Qwen3 models, across left padding and attention
buckets, with the same stop semantics; sampling must draw from softmax(logits/T) and report logprobs the
learner recomputes. Both paths call one sampler with keyed randomness, so a seed must give the same sampled
tokens on both, however the prompts are split across calls and whether or not finished rows are compacted.
(The sampler's own tests: test_sampling.py.)
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from winnow.engines.hf import PREFILL_SHARE, HFEngine, HFEngineConfig
from winnow.engines.static_decode import StaticDecoder, unsupported_reason
from winnow.learner.batch import make_train_batch
from winnow.learner.logprobs import sequence_logprobs
from winnow.types import SamplingParams


def encode(tokenizer, *texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def engines(model, tokenizer, bucket=128):
    hf = HFEngine(model, tokenizer, HFEngineConfig(decode="hf"), device="cpu")
    static = HFEngine(model, tokenizer, HFEngineConfig(decode="static", attention_bucket=bucket), device="cpu")
    return hf, static


def assert_same_greedy(hf, static, prompts, tolerance=2e-5, **params):
    """Greedy responses of both engines: same ids, finish reasons and text, logprobs within `tolerance`."""
    params = SamplingParams(temperature=0.0, **params)
    want, got = hf.generate(prompts, params), static.generate(prompts, params)
    assert [c.response_ids for c in got] == [c.response_ids for c in want], params
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want], params
    assert [c.text for c in got] == [c.text for c in want], params
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=tolerance)
    return got


def _other_model(kind, tokenizer):
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":  # Llama 3 RoPE scaling: the rotary tables come from the model's own module
        config = LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    else:  # Qwen3: q/k RMSNorm per head and an explicit head_dim
        config = Qwen3Config(**common, head_dim=32)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("bucket", [128, 4])
def test_greedy_matches_the_transformers_forward(tiny_model, tiny_tokenizer, bucket):
    # Prompts of different lengths (left padding) and, with bucket 4, attention widths that change every
    # 4 tokens: each must give exactly the hf path's tokens and logprobs.
    hf, static = engines(tiny_model, tiny_tokenizer, bucket)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1")
    assert_same_greedy(hf, static, prompts, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_matches_on_llama_and_qwen3(tiny_tokenizer, kind):
    model = _other_model(kind, tiny_tokenizer)
    assert unsupported_reason(model) is None
    hf, static = engines(model, tiny_tokenizer, bucket=8)
    assert_same_greedy(hf, static, encode(tiny_tokenizer, "12+34=", "5+7="), max_tokens=10, ignore_eos=True)


def test_stops_match_the_hf_path(tiny_model, tiny_tokenizer):
    hf, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    free = hf.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    # Stop on a token and on a string that the greedy responses actually produce, at different steps.
    token = free[0].response_ids[3]
    text = tiny_tokenizer.decode(free[1].response_ids[2:4])
    assert_same_greedy(hf, static, prompts, max_tokens=10, ignore_eos=True, stop_token_ids=[token])
    assert_same_greedy(hf, static, prompts, max_tokens=10, ignore_eos=True, stop=[text])
    got = static.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                                  stop_token_ids=[token]))
    assert got[0].finish_reason == "stop" and got[0].response_ids[-1] == token and len(got[0].response_ids) <= 4


def test_seeded_sampling_replays_and_logprobs_match_the_learner(tiny_model, tiny_tokenizer):
    _, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    params = SamplingParams(temperature=0.7, max_tokens=10, n=4, seed=5, ignore_eos=True)
    a, b = static.generate(prompts, params), static.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    params.seed = 6
    assert [c.response_ids for c in static.generate(prompts, params)] != [c.response_ids for c in a]
    # The learner's recomputation at the same temperature gives the engine's logprobs.
    batch = make_train_batch(a, torch.zeros(len(a)), pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        learner = sequence_logprobs(tiny_model, batch, temperature=0.7)
    engine = torch.zeros_like(learner)
    for row, c in enumerate(a):
        start = len(c.prompt_ids)
        engine[row, start : start + len(c.logprobs)] = torch.tensor(c.logprobs)
    assert torch.allclose(learner, engine, atol=2e-5)


def test_weight_sync_reaches_the_static_decoder(tiny_model, tiny_tokenizer):
    hf, static = engines(tiny_model, tiny_tokenizer)
    prompts = encode(tiny_tokenizer, "12+34=")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = static.generate(prompts, params)[0]
    new = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in tiny_model.named_parameters()}
    static.update_weights(new.items())
    hf.update_weights(new.items())
    after = static.generate(prompts, params)[0]
    assert after.logprobs != before.logprobs
    assert after.response_ids == hf.generate(prompts, params)[0].response_ids
    assert after.logprobs == pytest.approx(hf.generate(prompts, params)[0].logprobs, abs=2e-5)


def test_fused_projections_share_the_parameters_and_follow_a_replacement(tiny_model, tiny_tokenizer):
    hf, static = engines(tiny_model, tiny_tokenizer)
    layer, fused = static.decoder.body.layers[0], static.decoder._fused[0]
    attn, mlp = layer.self_attn, layer.mlp
    # q, k, v (with their biases) and gate, up are views of one buffer each: no second copy of the weights.
    q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    assert fused.qkv_sizes == (q_rows, k_rows, attn.v_proj.weight.shape[0])
    assert attn.k_proj.weight.data_ptr() == fused.qkv_weight[q_rows].data_ptr()
    assert attn.v_proj.bias.data_ptr() == fused.qkv_bias[q_rows + k_rows].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == fused.gate_up_weight[mlp.gate_proj.weight.shape[0]].data_ptr()
    # A parameter given a new tensor (not copied into) leaves the buffer: the next call fuses again, so the
    # static path keeps computing what the model's modules compute.
    prompts = encode(tiny_tokenizer, "12+34=", "7*8=")
    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight + 0.3 * torch.randn_like(attn.k_proj.weight)
        mlp.up_proj.weight.data = mlp.up_proj.weight.flip(0).clone()
        hf.model.load_state_dict(static.model.state_dict())
    assert_same_greedy(hf, static, prompts, max_tokens=6, ignore_eos=True)
    assert attn.k_proj.weight.data_ptr() == static.decoder._fused[0].qkv_weight[q_rows].data_ptr()


def test_unsupported_models_fall_back_or_fail_clearly(tiny_tokenizer):
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1,
                                                       n_head=2, eos_token_id=tiny_tokenizer.eos_token_id))
    assert "gpt2" in unsupported_reason(gpt2)
    assert HFEngine(gpt2, tiny_tokenizer, HFEngineConfig(decode="auto"), device="cpu").decoder is None
    with pytest.raises(ValueError, match="use decode='hf'"):
        HFEngine(gpt2, tiny_tokenizer, HFEngineConfig(decode="static"), device="cpu")
    with pytest.raises(ValueError, match="decode='nope'"):
        HFEngine(gpt2, tiny_tokenizer, HFEngineConfig(decode="nope"), device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StaticDecoder  # noqa: B018  (the class is importable without CUDA)
        HFEngine(_other_model("llama", tiny_tokenizer), tiny_tokenizer, HFEngineConfig(decode="graph"), device="cpu")


def test_sampled_frequencies_match_the_hf_path(tiny_model, tiny_tokenizer):
    # Both paths draw from the same distribution: the first token's frequencies over many samples agree.
    hf, static = engines(tiny_model, tiny_tokenizer)
    prompt = encode(tiny_tokenizer, "5+7=")
    params = SamplingParams(temperature=1.0, max_tokens=1, n=3000, seed=0, ignore_eos=True)
    counts = []
    for engine in (hf, static):
        ids = torch.tensor([c.response_ids[0] for c in engine.generate(prompt, params)])
        counts.append(torch.bincount(ids, minlength=len(tiny_tokenizer)).double() / 3000)
    with torch.no_grad():
        probs = torch.softmax(tiny_model(torch.tensor(prompt)).logits[0, -1].double(), -1)
    for freq in counts:  # 4.5 standard errors of the largest probability at 3000 draws
        assert (freq - probs).abs().max() < 4.5 * math.sqrt(0.25 / 3000)


def assert_same_samples(want, got, tolerance=2e-5):
    assert [c.response_ids for c in got] == [c.response_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=tolerance)


@pytest.mark.parametrize("truncation", [{}, {"top_k": 5}, {"top_p": 0.8},
                                        {"temperature": 0.7, "top_k": 8, "top_p": 0.9}])
def test_both_paths_sample_the_same_tokens(tiny_model, tiny_tokenizer, truncation):
    # One sampler, keyed by (prompt seed, sample index, step): the same seed gives the same responses on the
    # transformers path and on the fixed-shape step, with and without top-k/top-p.
    hf, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    params = SamplingParams(**{"temperature": 1.0, **truncation}, max_tokens=10, n=4, seed=11)
    want = hf.generate(prompts, params)
    assert_same_samples(want, static.generate(prompts, params))
    assert len({tuple(c.response_ids) for c in want}) > 4  # they did sample


@pytest.mark.parametrize("decode", ["hf", "static"])
def test_splitting_the_prompts_changes_no_response(tiny_model, tiny_tokenizer, decode):
    # What a runtime that shards prompts across engine replicas relies on: with one seed per prompt, prompts
    # [p0, p1, p2] in one call give, per prompt, the responses of [p0] and [p2, p1] in two calls (other batch
    # neighbours, other padding, other rows) and of the same call split into chunks of 2 rows.
    config = dict(decode=decode, attention_bucket=4)
    engine = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(**config), device="cpu")
    chunked = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(**config, max_batch_size=2), device="cpu")
    p0, p1, p2 = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    sampling = dict(temperature=1.0, top_k=8, max_tokens=10, n=3, ignore_eos=True)
    whole = engine.generate([p0, p1, p2], SamplingParams(**sampling, prompt_seeds=[101, 202, 303]))
    first = engine.generate([p0], SamplingParams(**sampling, prompt_seeds=[101]))
    rest = engine.generate([p2, p1], SamplingParams(**sampling, prompt_seeds=[303, 202]))
    assert_same_samples(whole, first + rest[3:] + rest[:3])
    assert_same_samples(whole, chunked.generate([p0, p1, p2], SamplingParams(**sampling,
                                                                          prompt_seeds=[101, 202, 303])))
    assert len({tuple(c.response_ids) for c in whole}) > 3


def stopping_rollout(hf, tokenizer):
    """(prompts, params, the hf engine's responses) of 8 prompts x 2 samples whose rows stop at different steps."""
    prompts = encode(tokenizer, "12+34=", "5+7=", "99+1=", "1", "3*4=", "7-2=", "10+10=", "8")
    stops = tokenizer.convert_tokens_to_ids(["+", "=", "7"])
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=21, stop_token_ids=stops, ignore_eos=True)
    want = hf.generate(prompts, params)
    lengths = sorted(c.num_tokens for c in want)
    assert lengths[0] < lengths[len(lengths) // 2] < lengths[-1]  # rows stopped at different steps
    return prompts, params, want


def test_compaction_does_not_change_sampled_responses(tiny_model, tiny_tokenizer):
    # Rows that stop at different steps, compacted after every token down to one row: each row's key moves
    # with it, so the responses are those of the hf path and of the static path without compaction.
    hf, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    _, uncompacted = engines(tiny_model, tiny_tokenizer, bucket=4)
    static.decoder.min_rows, static.decoder.check_every = 1, 1
    uncompacted.decoder.min_rows = None
    prompts, params, want = stopping_rollout(hf, tiny_tokenizer)
    assert_same_samples(want, static.generate(prompts, params))
    assert static.decoder.active < len(prompts) * 2  # ... and the decoder did compact them
    assert_same_samples(want, uncompacted.generate(prompts, params))
    assert uncompacted.decoder.active == len(prompts) * 2


def test_refill_gives_every_request_the_responses_of_one_batch(tiny_model, tiny_tokenizer):
    # 16 requests through 3 slots: a row that stops hands its slot to the next waiting request. Each request
    # keeps its own key, so its response is the one the hf path samples with all 16 in one batch, and the one
    # chunks of 3 run one after the other sample; refill takes fewer decode steps than the chunks.
    hf, _ = engines(tiny_model, tiny_tokenizer)
    config = dict(decode="static", attention_bucket=4, max_batch_size=3)
    refill = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(**config), device="cpu")
    chunks = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(**config, refill=False), device="cpu")
    refill.decoder.check_every = chunks.decoder.check_every = 2
    prompts, params, want = stopping_rollout(hf, tiny_tokenizer)
    assert_same_samples(want, refill.generate(prompts, params))
    assert refill.decoder.refills >= 2 and refill.decoder.out_tokens.shape[0] == 3
    assert_same_samples(want, chunks.generate(prompts, params))
    assert refill.decoder.decode_steps < chunks.decoder.decode_steps
    # Stop strings, found on the host, free slots too; and a one-token call refills at every prefill.
    stop = dict(temperature=1.0, max_tokens=12, n=2, seed=4, stop=["1", "5"], ignore_eos=True)
    assert_same_samples(hf.generate(prompts, SamplingParams(**stop)), refill.generate(prompts, SamplingParams(**stop)))
    one = dict(temperature=1.0, max_tokens=1, n=2, seed=5)
    assert_same_samples(hf.generate(prompts, SamplingParams(**one)), refill.generate(prompts, SamplingParams(**one)))


def test_refill_waits_for_enough_free_slots_and_then_compacts(tiny_model, tiny_tokenizer):
    # 16 slots for 40 requests: a refill waits until an eighth of the slots (2) are free or nothing else waits;
    # once no request waits, the last rows are compacted. The responses are still the hf path's.
    hf, _ = engines(tiny_model, tiny_tokenizer)
    static = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static", attention_bucket=4,
                                                                 max_batch_size=16), device="cpu")
    static.decoder.min_rows, static.decoder.check_every = 1, 1
    texts = ["12+34=", "5+7=", "99+1=", "1", "3*4=", "7-2=", "10+10=", "8", "2", "45"]
    prompts = encode(tiny_tokenizer, *(texts * 2))
    stops = tiny_tokenizer.convert_tokens_to_ids(["+", "=", "7"])
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=8, stop_token_ids=stops, ignore_eos=True)
    want = hf.generate(prompts, params)
    assert len({c.num_tokens for c in want}) >= 6  # lengths spread
    assert_same_samples(want, static.generate(prompts, params))
    assert 2 <= static.decoder.refills < 24  # one refill per freed slot would be 24
    assert static.decoder.active < 16


def test_samples_of_one_prompt_point_at_a_row_that_holds_the_same_prompt(tiny_model, tiny_tokenizer):
    # The attention kernel reads a row's prompt columns from `prompt_row`. Through refills (16 slots, 40 requests
    # of 2 samples) and compactions down to one row, before every step each active row must point at an active
    # row no later than itself whose prompt K/V are the same bytes as its own.
    hf, _ = engines(tiny_model, tiny_tokenizer)
    static = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static", attention_bucket=4,
                                                                 max_batch_size=16), device="cpu")
    decoder = static.decoder
    decoder.min_rows, decoder.check_every = 1, 1
    checked, shared, step = [], [], decoder._step

    def checked_step(width):
        rows, columns = decoder.active, int(decoder.prompt_columns)
        source = decoder.prompt_row[:rows]
        assert (source <= torch.arange(rows)).all()
        assert (decoder.prompt_id[source] == decoder.prompt_id[:rows]).all()
        for cache in (decoder.k_cache, decoder.v_cache):
            assert torch.equal(cache[:, source, :, :columns], cache[:, :rows, :, :columns])
        checked.append(rows)
        shared.append(int((source != torch.arange(rows)).sum()))
        step(width)

    decoder._step = checked_step
    texts = ["12+34=", "5+7=", "99+1=", "1", "3*4=", "7-2=", "10+10=", "8", "2", "45"]
    prompts = encode(tiny_tokenizer, *(texts * 2))
    stops = tiny_tokenizer.convert_tokens_to_ids(["+", "=", "7"])
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=8, stop_token_ids=stops, ignore_eos=True)
    assert_same_samples(hf.generate(prompts, params), static.generate(prompts, params))
    assert decoder.refills >= 2 and min(checked) < 16  # it refilled and compacted
    assert shared[0] == 8  # 16 slots of 8 prompts x 2 samples: one of each pair reads the other's columns


def test_prefill_in_chunks_of_distinct_prompts_changes_nothing(tiny_model, tiny_tokenizer):
    # A prefill memory that holds one distinct prompt at a time: 3 prompts x 2 samples prefill in 3 chunks, each
    # prompt's K/V going to both its rows; the responses are the unchunked ones.
    hf, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=3, ignore_eos=True)
    width = max(map(len, prompts))
    static.decoder.prefill_memory = static.decoder.prefill_bytes_per_prompt(width) + 1
    calls = []
    original = static.decoder._prefill_chunk
    static.decoder._prefill_chunk = lambda *args: calls.append(args[-2]) or original(*args)
    assert_same_samples(hf.generate(prompts, params), static.generate(prompts, params))
    assert calls == [0, 1, 2]


@pytest.mark.slow
def test_batch_size_chunks_evenly_and_the_row_estimate_covers_the_buffers(tiny_model, tiny_tokenizer):
    engine = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static"), device="cpu")
    # auto (0) off a GPU: at most 256 a chunk, as equal as the count allows (600 -> 3 x 200: one shape of
    # buffers and graphs serves every chunk); a set size splits the same way.
    assert engine._chunk_size(600, 100) == 200 and engine._chunk_size(256, 100) == 256
    engine.config.max_batch_size = 4
    assert engine._chunk_size(9, 100) == 3 and engine._chunk_size(8, 100) == 4
    with pytest.raises(ValueError, match="--engine.max-batch-size"):
        HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static", max_batch_size=-1), device="cpu")
    with pytest.raises(ValueError, match="--engine.kv-cache-memory"):
        HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static", kv_cache_memory=1.5), device="cpu")
    # What auto sizing on a GPU divides the memory budget by: one row's buffers after a call of 3 prompts x 2
    # samples must be at least the K/V cache and no more than the per-row estimate.
    engine.config.max_batch_size = 0
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=")
    engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=7, n=2, seed=0))
    decoder, rows = engine.decoder, 6
    cache = decoder.k_cache.numel() * decoder.k_cache.element_size() * 2
    shared = sum(getattr(decoder, name).numel() * getattr(decoder, name).element_size()
                 for name in ("cos_table", "sin_table", "columns"))  # not per row
    assert cache <= decoder.buffer_bytes() <= rows * decoder.bytes_per_row(max(map(len, prompts)) + 7) + shared
    decoder.release()
    assert decoder.buffer_bytes() == 0


def test_compiled_decode_gives_the_same_tokens(tiny_model, tiny_tokenizer):
    hf = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="hf"), device="cpu")
    compiled = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="static", compile_decode=True),
                        device="cpu")
    assert_same_greedy(hf, compiled, encode(tiny_tokenizer, "12+34=", "5+7="), max_tokens=6, ignore_eos=True)


# ------------------------------------------------------------------ the CUDA-graph path (runs where a GPU is)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def gpu_engines(model, tokenizer):
    # float32 on both paths, so the graph path must give the hf path's tokens exactly.
    hf = HFEngine(model, tokenizer, HFEngineConfig(decode="hf", dtype="float32"), device="cuda")
    graph = HFEngine(model, tokenizer, HFEngineConfig(decode="graph", dtype="float32", attention_bucket=4),
                     device="cuda")
    return hf, graph


@needs_cuda
def test_auto_batch_size_fits_the_memory_budget_on_gpu(tiny_model, tiny_tokenizer):
    # A budget that holds only a few rows' buffers: the call runs 5 rows at a time (refilled as they finish; 4
    # equal chunks of 4 without refill) and samples what one batch samples (keyed draws), and a roomy budget takes
    # the whole call at once.
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1")
    params = SamplingParams(temperature=1.0, max_tokens=12, n=4, seed=5, ignore_eos=True)
    roomy = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="graph", dtype="float32"), device="cuda")
    max_len = max(map(len, prompts)) + 12
    assert roomy._chunk_size(16, max_len) == 16
    tight = HFEngine(tiny_model, tiny_tokenizer, HFEngineConfig(decode="graph", dtype="float32"), device="cuda")
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    # 5 rows (4 chunks of 4 without refill) besides the prefill's share
    tight.config.kv_cache_memory = 5.5 * tight.decoder.bytes_per_row(max_len) / free / (1 - PREFILL_SHARE)
    assert tight._chunk_size(16, max_len) == 4
    assert_same_samples(roomy.generate(prompts, params), tight.generate(prompts, params))
    assert tight.decoder.out_tokens.shape[0] == 5


@needs_cuda
def test_graph_decode_matches_the_hf_path_on_gpu(tiny_model, tiny_tokenizer):
    hf, graph = gpu_engines(tiny_model, tiny_tokenizer)
    assert graph.decoder is not None and graph.decoder.use_graphs
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1")
    free = hf.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    token, text = free[0].response_ids[3], tiny_tokenizer.decode(free[1].response_ids[2:4])
    for extra in ({}, {"stop_token_ids": [token]}, {"stop": [text]}):
        assert_same_greedy(hf, graph, prompts, tolerance=1e-4, max_tokens=10, ignore_eos=True, **extra)
    assert graph.decoder.last_capture_seconds > 0


@needs_cuda
def test_graph_decode_samples_the_hf_paths_tokens_on_gpu(tiny_model, tiny_tokenizer):
    # The captured step reads the step counter and the row keys from device buffers: the same seed must give
    # the hf path's tokens, also with top-k/top-p and with compaction mid-generation.
    hf, graph = gpu_engines(tiny_model, tiny_tokenizer)
    graph.decoder.min_rows, graph.decoder.check_every = 1, 2
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1")
    stops = tiny_tokenizer.convert_tokens_to_ids(["+", "="])
    for extra in ({}, {"top_k": 5, "top_p": 0.9}, {"stop_token_ids": stops}):
        params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=13, ignore_eos=True, **extra)
        assert_same_samples(hf.generate(prompts, params), graph.generate(prompts, params), tolerance=1e-4)


@needs_cuda
def test_graph_sampling_replays_truncates_and_sees_synced_weights(tiny_model, tiny_tokenizer):
    hf, graph = gpu_engines(tiny_model, tiny_tokenizer)
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=")
    params = SamplingParams(temperature=1.0, max_tokens=10, n=8, seed=3, ignore_eos=True)
    a, b = graph.generate(prompts, params), graph.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    assert len({tuple(c.response_ids) for c in a}) > 1
    # top_k=1 and a tiny top_p keep only the most likely token: sampling must then give the greedy tokens,
    # while the logprobs stay those of the untruncated softmax (the greedy ones at T=1).
    greedy = graph.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for truncation in ({"top_k": 1}, {"top_p": 1e-6}):
        got = graph.generate(prompts, SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True,
                                                     **truncation))
        assert [c.response_ids for c in got] == [c.response_ids for c in greedy], truncation
        for x, y in zip(got, greedy):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    # An in-place sync is read by the captured graphs, without recapture.
    new = {name: p.detach().cuda() + 0.05 * torch.randn_like(p.cuda()) for name, p in tiny_model.named_parameters()}
    graph.update_weights(new.items())
    hf.update_weights(new.items())
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert [c.response_ids for c in graph.generate(prompts, params)] == \
        [c.response_ids for c in hf.generate(prompts, params)]


def test_compacting_finished_rows_changes_nothing_but_the_work(tiny_model, tiny_tokenizer):
    # Rows that stop at different steps: with compaction after every token down to one row, the responses,
    # finish reasons and logprobs must still be the hf path's, in the original row order.
    hf, static = engines(tiny_model, tiny_tokenizer, bucket=4)
    static.decoder.min_rows, static.decoder.check_every = 1, 1
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1", "3*4=", "7-2=", "10+10=", "8")
    free = hf.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stops = sorted({free[0].response_ids[1], free[3].response_ids[4], free[6].response_ids[7]})
    lengths = []
    for extra in ({"stop_token_ids": stops}, {"stop": [tiny_tokenizer.decode(free[2].response_ids[3:5])]}):
        got = assert_same_greedy(hf, static, prompts, max_tokens=12, ignore_eos=True, **extra)
        lengths.append(sorted(len(c.response_ids) for c in got))
    assert lengths[0][0] < lengths[0][-1]  # rows did stop at different steps ...
    assert static.decoder.active < len(prompts)  # ... and the decoder ran on fewer rows after they did
    # Seeded sampling with compaction replays exactly.
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=9, stop_token_ids=stops)
    a, b = static.generate(prompts, params), static.generate(prompts, params)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]


@needs_cuda
def test_graph_decode_compaction_on_gpu(tiny_model, tiny_tokenizer):
    # As the CPU test above, through captured graphs: new graphs for each smaller row count, mid-generation.
    hf, graph = gpu_engines(tiny_model, tiny_tokenizer)
    graph.decoder.min_rows, graph.decoder.check_every = 1, 2
    prompts = encode(tiny_tokenizer, "12+34=", "5+7=", "99+1=", "1", "3*4=", "7-2=", "10+10=", "8")
    free = hf.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stops = sorted({free[0].response_ids[1], free[3].response_ids[4], free[6].response_ids[7]})
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=stops)
    got = assert_same_greedy(hf, graph, prompts, tolerance=1e-4, max_tokens=12, ignore_eos=True,
                             stop_token_ids=stops)
    assert graph.decoder.active < len(prompts)
    assert {rows for rows, _ in graph.decoder._graphs} > {len(prompts)}
    # A second call starts again from all rows, reusing every graph captured so far.
    again = graph.generate(prompts, params)
    assert [c.response_ids for c in again] == [c.response_ids for c in got]


@needs_cuda
def test_graph_decode_refill_on_gpu(tiny_model, tiny_tokenizer):
    # As the CPU refill tests, through captured graphs: slots refilled mid-call at their own columns, graphs
    # captured at first use, compaction at the end; sampled responses and logprobs are the hf path's.
    hf, graph = gpu_engines(tiny_model, tiny_tokenizer)
    graph.config.max_batch_size = 5
    graph.decoder.min_rows, graph.decoder.check_every = 1, 2
    prompts, params, want = stopping_rollout(hf, tiny_tokenizer)
    assert_same_samples(want, graph.generate(prompts, params), tolerance=1e-4)
    assert graph.decoder.refills >= 2 and graph.decoder.out_tokens.shape[0] == 5
    assert_same_samples(want, graph.generate(prompts, params), tolerance=1e-4)  # again, on the kept graphs


KERNELS_AHEAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
from triton.runtime import jit
from winnow.data.tiny import train_char_tokenizer
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.engines.static_decode import compile_kernels
from winnow.types import SamplingParams

compiled = []
original = jit.JITFunction._do_compile
def counted(self, *args, **kwargs):
    compiled.append(self.fn.__name__)
    return original(self, *args, **kwargs)
jit.JITFunction._do_compile = counted
tokenizer = train_char_tokenizer(["0123456789+-*= "])
config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12+34=", "5+7=", "99+1=", "1")]
params = SamplingParams(temperature=1.0, max_tokens=40, n=4, seed=0)
launched = compile_kernels(model.config, torch.bfloat16, torch.device("cuda"), params, rows=16,
                           max_len=max(map(len, prompts)) + 40, bucket=16, min_rows=2)
ahead = list(compiled)
engine = HFEngine(model, tokenizer, HFEngineConfig(decode="graph", attention_bucket=16, min_active_rows=2),
                  device="cuda")
engine.decoder.check_every = 4
completions = engine.generate(prompts, params)
print(json.dumps({"launched": launched, "ahead": ahead, "generate": compiled[len(ahead):],
                  "lengths": [c.num_tokens for c in completions], "active": engine.decoder.active}))
"""


@needs_cuda
def test_kernels_compiled_ahead_leave_the_decoder_nothing_to_compile(tmp_path):
    # In a process of its own, on an empty Triton cache: `compile_kernels` at the engine's sizes, then the engine's
    # first call (sampled, so rows stop early and compaction halves them): the call compiles no kernel.
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KERNELS_AHEAD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["launched"] == ["chunk_mass", "rope_cache", "attend"]
    assert {"chunk_mass", "rope_cache", "attend"} <= set(result["ahead"])
    assert result["generate"] == [], result
    assert result["active"] < 16  # the call compacted its rows: those attention launches were compiled ahead too


def test_distinct_rows_index_each_prompt_once():
    """The prefill runs each distinct prompt row once (a prompt's n samples share it): first occurrences in
    order, and every row mapped back to its own."""
    from winnow.engines.static_decode import _distinct_rows

    rows = torch.tensor([[5, 6], [1, 2], [5, 6], [1, 2], [9, 9], [5, 6]])
    first, inverse = _distinct_rows(rows)
    assert first.tolist() == [0, 1, 4]
    assert inverse.tolist() == [0, 1, 0, 1, 2, 0]
    assert torch.equal(rows[first][inverse], rows)
