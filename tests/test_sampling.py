"""The engine's one sampler (`winnow/engines/sampling.py`): the keyed hash, the inverse CDF, the distribution.

Engine-level checks (both decode paths give the same tokens; splitting prompts across calls changes nothing)
are in test_static_decode.py.
"""
from __future__ import annotations

import ast
import inspect

import pytest
import torch

from winnow.engines.sampling import (Sampler, chunk_width, hash_pair, inverse_cdf, mix64, prompt_seeds, row_keys,
                                    two_level_draw, uniforms)
from winnow.types import SamplingParams

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64_reference(state: int) -> int:
    """SplitMix64's output for a state (already advanced by GOLDEN), on plain Python unsigned integers."""
    z = state & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_hash_matches_a_plain_python_reference():
    # Key 0 gives the standard SplitMix64 stream from seed 0, whose first outputs are published values.
    assert splitmix64_reference(GOLDEN) == 0xE220A8397B1DCDAF
    assert splitmix64_reference(2 * GOLDEN) == 0x6E789E6AA1B965F4
    keys = torch.tensor([0, 1, -1, 12345, 2**62, -(2**63), 2**63 - 1])
    for step in (0, 1, 7, 1000):
        got = hash_pair(keys, torch.tensor([step]))
        want = [splitmix64_reference(k + GOLDEN * (step + 1)) for k in keys.tolist()]
        assert [g & MASK for g in got.tolist()] == want  # int64 bits read as unsigned
        assert torch.equal(got, hash_pair(keys, step))  # an int step is the same as a tensor step
    assert mix64(torch.tensor([5])).item() & MASK == splitmix64_reference(5)
    # The uniforms are the top 24 bits plus one, over 2^24: 0xE220A8 = 14819496 -> 14819497 / 2^24, exactly.
    u = uniforms(torch.tensor([0, 0]), torch.tensor([0]))
    assert u.dtype == torch.float32 and u[0].item() == 14819497 / 2**24 and u[0] == u[1]
    assert uniforms(torch.tensor([0]), 1).item() == ((0x6E789E6AA1B965F4 >> 40) + 1) / 2**24


def test_row_keys_depend_only_on_the_prompt_seed_and_the_sample_index():
    keys = row_keys([11, 22, 33], n=2)  # [6]: (prompt 0, j 0), (0, 1), (1, 0), ...
    assert keys.shape == (6,) and keys.dtype == torch.long and len(set(keys.tolist())) == 6
    assert torch.equal(row_keys([33, 11], n=2), keys[[4, 5, 0, 1]])
    assert torch.equal(row_keys([22], n=3)[:2], keys[2:4])  # n does not change the first samples' keys
    # Without prompt_seeds, prompt i's seed comes from (seed, i): deterministic, distinct per prompt and seed.
    a = prompt_seeds(SamplingParams(seed=3), 3)
    assert a == prompt_seeds(SamplingParams(seed=3), 3) and len(set(a)) == 3
    assert prompt_seeds(SamplingParams(seed=3), 2) == a[:2] and prompt_seeds(SamplingParams(seed=4), 3) != a
    assert prompt_seeds(SamplingParams(seed=3, prompt_seeds=[7, 8]), 2) == [7, 8]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        prompt_seeds(SamplingParams(prompt_seeds=[7, 8]), 3)
    # Unseeded calls draw their base seed from the generator: fresh samples per call, replayable from its seed.
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first = prompt_seeds(SamplingParams(), 2, g1)
    assert first == prompt_seeds(SamplingParams(), 2, g2) and first != prompt_seeds(SamplingParams(), 2, g1)


def test_inverse_cdf_by_hand():
    # probs [0.1, 0.2, 0.7]: cumsum [0.1, 0.3, 1.0]. u = 0.05 -> no entry below 0.05 -> token 0;
    # u = 0.25 -> one entry (0.1) below -> token 1; u = 0.31 -> two entries (0.1, 0.3) below -> token 2.
    probs = torch.tensor([0.1, 0.2, 0.7]).expand(3, 3)
    assert inverse_cdf(probs, torch.tensor([0.05, 0.25, 0.31])).tolist() == [0, 1, 2]
    # Unnormalised weights [1, 2, 7] (total 10) give the same tokens: u is scaled by the total.
    assert inverse_cdf(probs * 10, torch.tensor([0.05, 0.25, 0.31])).tolist() == [0, 1, 2]
    # A token of probability 0 is never drawn, even with u right at the boundary before it.
    zeroed = torch.tensor([[0.5, 0.0, 0.5]]).expand(4, 3)
    assert inverse_cdf(zeroed, torch.tensor([1e-7, 0.4999, 0.5, 0.9999999])).tolist() == [0, 0, 0, 2]


def test_two_level_draw_by_hand():
    # weights [1, 2, 3, 4 | 0, 6, 0, 4] over chunks of 4: chunk masses 10 and 10, total 20.
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 6.0, 0.0, 4.0])
    logits = weights.log().expand(6, 8).contiguous()  # log 0 = -inf: probability 0
    u = torch.tensor([0.01, 0.1, 0.5, 0.5000001, 0.75, 1.0])
    # u * 20 = 0.2 -> chunk 0, token 0; 2 -> chunk 0, cumsum [1, 3, ...] -> token 1; 10 -> chunk 0's end, token 3;
    # just above 10 -> chunk 1 with a remainder near 0: token 5 (token 4 has probability 0); 15 -> remainder 5
    # in chunk 1's cumsum [0, 6, 6, 10] -> token 5; 20 -> the last token of positive probability, 7.
    tokens, logprobs = two_level_draw(logits, u, width=4)
    assert tokens.tolist() == [0, 1, 3, 5, 5, 7]
    assert torch.allclose(logprobs, (weights / 20).log()[tokens], atol=1e-6)
    # The same draw with one chunk over the whole vocabulary, and with inverse_cdf over the softmax.
    assert two_level_draw(logits, u, width=8)[0].tolist() == [0, 1, 3, 5, 5, 7]
    assert inverse_cdf(torch.softmax(logits, -1), u).tolist() == [0, 1, 3, 5, 5, 7]


def test_two_level_draw_matches_the_full_inverse_cdf():
    # Qwen's vocabulary (151,936 = 64 chunks of 2,374) and a prime one (padded chunks of 2,048), with whole
    # chunks of -inf: the same tokens as the one-level draw except within float32 rounding of a boundary.
    assert chunk_width(151_936) == 2374 and chunk_width(10_007) == 2048 and chunk_width(1000) == 1000
    generator = torch.Generator().manual_seed(0)
    for vocab in (151_936, 10_007):
        logits = torch.randn(64, vocab, generator=generator) * 4
        logits[:8, : vocab // 2] = float("-inf")
        u = uniforms(row_keys(list(range(64)), n=1), 0)
        tokens, logprobs = two_level_draw(logits, u)
        want = inverse_cdf(torch.softmax(logits, -1), u)
        assert int((tokens != want).sum()) <= 1, vocab
        assert bool(torch.isfinite(logits.gather(-1, tokens[:, None])).all())  # never a token of probability 0
        # against float64 (float32's own log_softmax is off by ~5e-5 here; the chunked sums by ~1e-6)
        want_logprobs = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(logprobs.double(), want_logprobs, atol=5e-6, rtol=0)


def test_sampler_draws_from_the_softmax():
    # logits [0, log 2, log 3, log 4]/T with T=1 -> probabilities 0.1, 0.2, 0.3, 0.4.
    rows = 40_000
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).expand(rows, 4).contiguous()
    keys = row_keys(list(range(rows)), n=1)
    tokens, logprobs = Sampler(temperature=1.0)(logits, keys, 0)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    # 4 standard errors of a frequency near 0.4 at 40k draws: sqrt(.24/40000) = 0.00245 -> 0.0098.
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01)
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens], atol=1e-6)
    # top_k=2 keeps tokens 2 and 3, drawn 3:4, while the logprob stays the untruncated one (log 0.3, log 0.4).
    tokens, logprobs = Sampler(temperature=1.0, top_k=2)(logits, keys, 1)
    assert set(tokens.tolist()) == {2, 3}
    assert abs((tokens == 3).double().mean().item() - 4 / 7) < 0.01
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens], atol=1e-6)
    # top_p=0.65 keeps 0.4 + 0.3 (the mass before token 1 is 0.7 >= 0.65): tokens 2 and 3, drawn 3:4.
    tokens, logprobs = Sampler(temperature=1.0, top_p=0.65)(logits, keys, 2)
    assert set(tokens.tolist()) == {2, 3}
    assert abs((tokens == 3).double().mean().item() - 4 / 7) < 0.01
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens], atol=1e-6)
    # Temperature 0.5 squares the odds: 1:4:9:16 over 30.
    tokens, logprobs = Sampler(temperature=0.5)(logits, keys, 3)
    want = torch.tensor([1, 4, 9, 16], dtype=torch.float64) / 30
    assert torch.allclose(torch.bincount(tokens, minlength=4).double() / rows, want, atol=0.01)
    assert torch.allclose(logprobs.double(), want.log()[tokens], atol=1e-5)
    # bfloat16 logits are sampled in float32, as float32 logits are.
    same, _ = Sampler(temperature=1.0)(logits.bfloat16().float(), keys, 0)
    assert torch.equal(Sampler(temperature=1.0)(logits.bfloat16(), keys, 0)[0], same)


def test_draws_are_independent_across_steps_and_rows():
    # One row over 40k steps draws from the same distribution as 40k rows at one step.
    steps = 40_000
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    key = row_keys([99], n=1)
    u = uniforms(key.expand(steps), torch.arange(steps))
    tokens = inverse_cdf(torch.softmax(logits, -1).expand(steps, 4).contiguous(), u)
    freq = torch.bincount(tokens, minlength=4).double() / steps
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01)
    # Neighbouring keys (samples j and j+1 of a prompt) and neighbouring steps are uncorrelated.
    keys = row_keys([1], n=steps)
    a, b = uniforms(keys, 0), uniforms(keys, 1)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.02
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.02
    assert 0 < u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01


def test_greedy_is_the_argmax_with_the_temperature_one_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    tokens, logprobs = Sampler(temperature=0.0)(logits, row_keys([1, 2], n=1), 0)
    assert tokens.tolist() == [1, 2]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 2]], atol=1e-6)
    assert Sampler.of(SamplingParams(temperature=0.0, top_k=3)) == Sampler(temperature=0.0)


def test_the_sampler_sits_below_both_decode_paths():
    # hf imports static_decode and sampling; neither of them imports hf: no import circle.
    from winnow.engines import sampling, static_decode

    for module in (sampling, static_decode):
        tree = ast.parse(inspect.getsource(module))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "winnow.engines.hf" not in imported, module.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_draws_what_the_cpu_draws():
    # The same int64 bits on both devices (wrap-around multiplies, masked shifts), hence the same uniforms;
    # and the same tokens from the same logits.
    keys = row_keys(list(range(1000)), n=4)
    for step in (0, 5, 1000):
        want = uniforms(keys, step)
        assert torch.equal(uniforms(keys.cuda(), torch.tensor([step], device="cuda")).cpu(), want)
    logits = torch.randn(4000, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for sampler in (Sampler(1.0), Sampler(0.7, top_k=50), Sampler(1.0, top_p=0.9)):
        tokens, logprobs = sampler(logits, keys, 3)
        cuda_tokens, cuda_logprobs = sampler(logits.cuda(), keys.cuda(), torch.tensor([3], device="cuda"))
        # The uniforms are the same bits; the CDFs are not quite: CPU accumulates the cumsum in float64, CUDA scans
        # in float32, so a u within ~1e-7 of a boundary can pick the neighbouring token (measured on an H200: 1 of
        # 4000 rows over the full vocabulary, 0 with top-k or top-p).
        same = cuda_tokens.cpu() == tokens
        assert int((~same).sum()) <= 4, sampler  # <= 0.1% of rows
        torch.testing.assert_close(cuda_logprobs.cpu()[same], logprobs[same], atol=1e-5, rtol=0)
