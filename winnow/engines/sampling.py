"""The one sampler of the `hf` engine's decode paths: keyed, split-invariant randomness and inverse-CDF draws.

Both decode loops (the transformers forward per token, and the fixed-shape step of `static_decode`, eager or
replayed as a CUDA graph) call `Sampler`, so one seed gives the same responses on either path.

Randomness is *keyed*, not drawn from a stateful generator: row r (sample j of prompt i) at decode step t uses

    key_r = hash(prompt_seed_i, j)            (`row_keys`, on the host, once per call)
    u     = uniform(hash(key_r, t))           (`uniforms`, on the device, one number per row and step)

so a row's draws depend only on its prompt's seed, j and t: never on its position in the batch, on what
else is in the batch, or on how a runtime splits the prompts across calls or engine replicas. `hash` is the
SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014; the
variant-13 constants of Stafford) in int64 tensor arithmetic, with wrap-around multiplies and masked
(logical) right shifts, so CPU and CUDA compute the same bits; with key 0 the uniforms' bits are the
standard SplitMix64 stream from seed 0.

The token is then drawn by inverse CDF over the temperature-scaled, top-k/top-p-truncated softmax (float32):
token = the number of entries of cumsum(probs) below u * total. That is an exact categorical draw with one
random number per row (no [B, V] noise), fixed-shape and free of host syncs, so it can be captured in a
CUDA graph. Without truncation the draw takes two levels (`two_level_draw`): the vocabulary is cut into
chunks of a few thousand tokens, the chunk is found from the chunks' masses and the token inside it, so the
[B, V] logits are read once or twice and no [B, V] float32 softmax or cumsum is written (at a 152k
vocabulary and 512 rows those took ~1 ms of a 4.6 ms decode step on an H200).
"""
from __future__ import annotations

from dataclasses import dataclass

from winnow.lazy import lazy_import
from winnow.types import SamplingParams

torch = lazy_import("torch")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
"""SplitMix64's increment: 2^64 / golden ratio, odd"""
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
"""the finaliser's multipliers (Stafford's variant 13, as in SplitMix64)"""


def _int64(value: int) -> int:
    """An integer taken mod 2^64, as the int64 with the same bits (tensors hold int64, not uint64)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors: a bijection of 64-bit values that scrambles every bit."""
    x = x ^ _shift_right(x, 30)
    x = x * _int64(_MIX1)  # int64 multiplies wrap around: the low 64 bits of the unsigned product
    x = x ^ _shift_right(x, 27)
    x = x * _int64(_MIX2)
    return x ^ _shift_right(x, 31)


def hash_pair(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """A well-mixed int64 of (a, b): mix64(a + GOLDEN * (b + 1)), SplitMix64's b-th output from state a.
    `a` should already be mixed (a key): two a's a multiple of GOLDEN apart would give shifted copies of one
    stream."""
    if isinstance(b, int):
        return mix64(a + _int64(_GOLDEN * (b + 1)))
    return mix64(a + (b + 1) * _int64(_GOLDEN))


def prompt_seeds(params: SamplingParams, num_prompts: int, generator: torch.Generator | None = None) -> list[int]:
    """One seed per prompt: `params.prompt_seeds` when given, else hash(params.seed, i) for prompt i; with
    neither, the base seed is drawn from `generator` (an unseeded call: fresh samples every time)."""
    if params.prompt_seeds is not None:
        if len(params.prompt_seeds) != num_prompts:
            raise ValueError(f"SamplingParams.prompt_seeds has {len(params.prompt_seeds)} seeds for "
                             f"{num_prompts} prompts: give one seed per prompt")
        return [int(seed) for seed in params.prompt_seeds]
    seed = params.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return hash_pair(mix64(torch.tensor([_int64(seed)])), torch.arange(num_prompts)).tolist()


def row_keys(seeds: list[int], n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The key of every row, [len(seeds) * n] int64: row i * n + j (sample j of prompt i) gets
    hash(mix64(seeds[i]), j)."""
    mixed = mix64(torch.tensor([_int64(s) for s in seeds], dtype=torch.long))
    return hash_pair(mixed[:, None], torch.arange(n)).flatten().to(device)


def uniforms(keys: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """One uniform per row in (0, 1], float32 [B], from row keys [B] int64 and the decode step (an int, or a
    device tensor [1] that a CUDA graph reads at replay): (top 24 bits of hash(key, step) + 1) / 2^24, exact
    in float32. Never 0, so `inverse_cdf` never draws a leading token of probability 0; 1 draws the last
    token of positive probability."""
    bits = _shift_right(hash_pair(keys, step), 40)
    return (bits + 1).float() * 2.0**-24


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [B, V] with the tokens outside the top-k and outside the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens [B] long drawn from (unnormalised) probs [B, V] float32 with uniforms u [B] in (0, 1]: the
    number of entries of cumsum(probs) below u * total, found by a binary search (one small kernel instead
    of a compare and a sum over [B, V]).

    A token of probability 0 is never drawn, because its cumsum entry equals the one before it and the
    search returns an index whose entry is above the one before. That needs a cumsum that is non-decreasing
    and exact over zeros: PyTorch's is, on CPU (accumulated in float64) and for a [B >= 2, V] tensor on
    CUDA (a Sklansky tree per row: every entry is a sum of the entry before its half and a partial of its
    own half). The total is the cumsum's own last entry, so the draw follows the float32 cumsum, which is
    off the exact softmax only by its rounding (about 1e-7 of the mass).
    """
    cdf = probs.cumsum(dim=-1)  # [B, V]
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(-1)


def chunk_width(vocab_size: int) -> int:
    """The chunk width of `two_level_draw`: the largest divisor of the vocabulary from 256 to 4096 (no padding:
    151,936 = 64 chunks of 2,374), else 2,048 (the last chunk padded); a vocabulary of at most 4096 is one chunk."""
    if vocab_size <= 4096:
        return vocab_size
    return next((k for k in range(4096, 255, -1) if vocab_size % k == 0), 2048)


def chunk_mass(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits cut into chunks [B, C, K] (any float dtype): the row's largest logit m [B, 1] and each chunk's
    mass sum(exp(x - m)) [B, C], both float32. Each chunk is reduced against its own maximum, then rescaled, so
    a compiled version reads the logits once."""
    peak = chunks.amax(dim=-1).float().clamp(min=torch.finfo(torch.float32).min)  # a chunk of -inf: no NaN
    local = torch.exp(chunks.float() - peak[..., None]).sum(dim=-1)
    top = peak.amax(dim=-1, keepdim=True)
    return top, local * torch.exp(peak - top)


def _chunk_mass(fused: bool, device):
    """The Triton kernel where asked for and possible (a CUDA device with Triton), else the torch function."""
    if fused:
        from winnow.engines import kernels

        if kernels.available(device):
            return kernels.chunk_mass
    return chunk_mass


def two_level_draw(logits: torch.Tensor, u: torch.Tensor, *, fused: bool = False, width: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse-CDF draw from softmax(logits) [B, V] (any float dtype) with uniforms u [B] in (0, 1], and the
    drawn token's log-probability: tokens [B] long, logprobs [B] float32.

    Level one finds the chunk: the first chunk c whose cumulative mass reaches u * total. Level two draws
    inside it with what remains of u * total, over that chunk's exp(x - m) alone ([B, K]). A token of
    probability 0 is never drawn, for the same reason as in `inverse_cdf` (a chunk of mass 0 never reaches
    the target; inside the chunk the remainder is positive and at most the chunk's own total). Equal to
    `inverse_cdf` over the full softmax up to float32 rounding at the boundaries between tokens. `fused` reads
    the logits with one Triton kernel on a GPU (`kernels.chunk_mass`); `width` overrides `chunk_width` (tests).
    """
    batch_size, vocab_size = logits.shape
    width = width or chunk_width(vocab_size)
    num_chunks = -(-vocab_size // width)
    padded = logits
    if num_chunks * width != vocab_size:
        padded = torch.nn.functional.pad(logits, (0, num_chunks * width - vocab_size), value=float("-inf"))
    chunks = padded.view(batch_size, num_chunks, width)
    top, mass = _chunk_mass(fused, logits.device)(chunks)
    cdf = mass.cumsum(dim=-1)  # [B, C]
    total = cdf[:, -1:]
    target = u[:, None].float() * total
    chunk = torch.searchsorted(cdf, target).clamp(max=num_chunks - 1)  # [B, 1]
    before = torch.where(chunk > 0, cdf.gather(-1, (chunk - 1).clamp(min=0)), torch.zeros_like(target))
    inner = torch.exp(chunks.gather(1, chunk[:, :, None].expand(batch_size, 1, width))[:, 0].float() - top)
    inner_cdf = inner.cumsum(dim=-1)  # [B, K]
    rest = torch.minimum(target - before, inner_cdf[:, -1:])  # the two levels' sums may round apart
    tokens = (chunk * width + torch.searchsorted(inner_cdf, rest).clamp(max=width - 1))[:, 0]
    logprobs = logits.gather(-1, tokens[:, None])[:, 0].float() - top[:, 0] - total[:, 0].log()
    return tokens, logprobs


@dataclass(frozen=True)
class Sampler:
    """Picks the next token of every row from its logits, with the token's log-probability.

    The logprob is taken under softmax(logits / temperature) *before* top-k/top-p truncation: that is the
    distribution the learner recomputes, so engine and learner logprobs agree (truncation only decides which
    tokens may be drawn). Greedy decoding (temperature 0) takes the argmax and reports the temperature-1
    logprob. Frozen and hashable: the static decoder keys its captured graphs by it.
    """

    temperature: float = 1.0
    """softmax temperature; 0 is greedy"""
    top_k: int = -1
    """keep only the k most likely tokens; -1 keeps all"""
    top_p: float = 1.0
    """keep the smallest set of most likely tokens whose mass reaches top_p"""
    fused: bool = False
    """run the untruncated draw's pass over the logits (`chunk_mass`) as one Triton kernel (GPU decode)"""

    @classmethod
    def of(cls, params: SamplingParams, fused: bool = False) -> "Sampler":
        if params.is_greedy:  # truncation does not change the argmax: one greedy sampler for all
            return cls(temperature=0.0)
        return cls(float(params.temperature), int(params.top_k), float(params.top_p), fused)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_truncating(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def __call__(self, logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor | int):
        """logits [B, V] of any float dtype, row keys [B] int64, the decode step (int or device tensor [1]).
        Returns (tokens [B] long, logprobs [B] float32)."""
        if self.is_greedy:
            logits = logits.float()
            tokens = logits.argmax(dim=-1)
            return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        scaled = logits if self.temperature == 1.0 else logits.float() / self.temperature
        if not self.is_truncating:
            return two_level_draw(scaled, uniforms(keys, step), fused=self.fused)
        scaled = scaled.float()
        log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
        probs = torch.exp(top_k_top_p(scaled, self.top_k, self.top_p) - log_norm)  # 0 where truncated
        tokens = inverse_cdf(probs, uniforms(keys, step))
        # probs holds the untruncated softmax at every token that can be drawn: its log is the logprob.
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
