"""Typed records that flow between winnow's stages.

Every stage boundary passes one of these, never a loose dict:

    Prompt ──Engine.generate──► Completion ──Oracle.reward──► Group ──Learner──► TrainBatch
    Env.reset, then turns of Engine.generate and Env.step ──► Episode ──Learner──► TrainBatch   (multi-turn)

Shapes use B for sequences in a batch and T for padded sequence length. Token ids are plain Python
lists on the records that cross process boundaries (they pickle cheaply and carry no device);
only `TrainBatch` holds tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from winnow.lazy import lazy_import

torch = lazy_import("torch")

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How the engine samples; names follow vLLM's `SamplingParams`."""

    temperature: float = 1.0
    """softmax temperature; 0 means greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (0, 1]"""
    top_k: int = -1
    """keep only the k most likely tokens; -1 keeps all"""
    max_tokens: int = 256
    """the most new tokens to generate per response"""
    n: int = 1
    """responses sampled per prompt"""
    stop: list[str] = field(default_factory=list)
    """strings that end a response; the stop string is cut from the returned text, while the ids keep the
    tokens that produced it, so the learner trains on exactly what was sampled"""
    stop_token_ids: list[int] = field(default_factory=list)
    """token ids that end a response, besides the tokenizer's EOS (the stop token is kept in the ids)"""
    ignore_eos: bool = False
    """keep generating past EOS until max_tokens (benchmarks use this to fix the length)"""
    seed: int | None = None
    """seed for this call; the same seed, prompts and weights give the same responses (prompt i's own seed is
    derived from it and i, unless prompt_seeds is given)"""
    prompt_seeds: list[int] | None = None
    """one seed per prompt of the call, overriding `seed`: sample j of a prompt draws its tokens from (its
    prompt's seed, j, step) alone, so the responses do not depend on how prompts are batched or split
    across calls and engine replicas"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k={self.top_k} must be -1 (off) or a positive integer")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Prompt:
    """One prompt from a dataset, rendered through its chat template."""

    text: str
    """the prompt as the model sees it (chat template applied)"""
    token_ids: list[int]
    """`text` tokenized, [prompt_len]"""
    reference: str | None = None
    """the reference answer (for verifiable rewards), or None"""
    columns: dict[str, Any] = field(default_factory=dict)
    """the dataset row's other columns, passed to user reward functions as keyword arguments"""
    index: int = -1
    """position of the row in its dataset"""


@dataclass
class Completion:
    """One sampled response to one prompt."""

    prompt_ids: list[int]
    """the prompt's token ids, [prompt_len]"""
    response_ids: list[int]
    """the sampled token ids, [response_len]; includes the EOS/stop token when one ended the response"""
    logprobs: list[float]
    """engine log-probability of each sampled token under the sampling distribution (logits / temperature,
    before top-k/top-p truncation), [response_len]; for greedy decoding, under temperature 1"""
    finish_reason: FinishReason
    """"stop" (EOS, a stop token or a stop string) or "length" (hit max_tokens)"""
    text: str
    """the decoded response, special tokens and any stop string removed"""
    sampled_by: str = "policy"
    """which policy sampled it: "policy", or "reference" (XPO's samples of the reference policy)"""

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class RewardResult:
    """What a reward oracle returns for a batch of N completions."""

    scores: list[float | None]
    """the combined reward per completion, [N]; None where the oracle could not score it"""
    components: dict[str, list[float | None]] = field(default_factory=dict)
    """each named reward function's own scores, [N] each, before weighting"""
    metrics: dict[str, float] = field(default_factory=dict)
    """the oracle's own numbers: latency, failures, retries"""

    @property
    def num_failed(self) -> int:
        return sum(s is None for s in self.scores)


@dataclass
class PreferenceResult:
    """What a preference oracle returns for N comparisons of response a with response b."""

    probabilities: list[float | None]
    """the probability that a beats b, [N]; None where the oracle could not judge that pair"""
    metrics: dict[str, float] = field(default_factory=dict)
    """the oracle's own numbers: latency, tokens, failures, retries"""

    @property
    def num_failed(self) -> int:
        return sum(p is None for p in self.probabilities)


@dataclass
class Group:
    """All sampled responses to one prompt, with their rewards: the unit that group advantages work on."""

    prompt: Prompt
    completions: list[Completion]
    """G responses to `prompt`"""
    rewards: list[float | None] = field(default_factory=list)
    """one reward per completion, [G]; None marks a completion the oracle could not score"""
    components: dict[str, list[float | None]] = field(default_factory=dict)
    """named reward components, [G] each"""

    @property
    def is_scored(self) -> bool:
        return len(self.rewards) == len(self.completions) and all(r is not None for r in self.rewards)


@dataclass
class Episode:
    """One multi-turn episode as one trajectory: the whole conversation's tokens, and which of them the policy
    sampled. [L] is the conversation's length: the first observation, then each turn's action and observation."""

    token_ids: list[int]
    """the conversation, [L]"""
    policy_mask: list[int]
    """1 on tokens the policy sampled (its actions), 0 on the environment's (observations, chat markup), [L]"""
    logprobs: list[float]
    """the engine's logprob of each policy token when it was sampled, 0.0 elsewhere, [L]"""
    turn_rewards: list[float] = field(default_factory=list)
    """the environment's reward after each turn, [num_turns]"""
    turn_ends: list[int] = field(default_factory=list)
    """the index in token_ids of each turn's last policy token, [num_turns]"""
    actions: list[str] = field(default_factory=list)
    """each turn's decoded action, [num_turns]"""
    observations: list[str] = field(default_factory=list)
    """the first observation, then the observation after each turn, [num_turns + 1]"""
    terminated: bool = False
    """the environment ended the episode (its return is final)"""
    truncated: bool = False
    """cut short before termination: by the environment's truncation, the turn limit or the token budget"""
    is_success: bool = False
    """the environment said the task was solved (info["success"]), or the last reward reached the success reward"""
    seed: int = 0
    """the reset seed: episodes with the same seed started in the same state (a group)"""

    @property
    def episode_return(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def num_policy_tokens(self) -> int:
        return int(sum(self.policy_mask))


@dataclass
class PreferencePair:
    """Two responses to one prompt and which one is preferred (for preference learning)."""

    prompt: Prompt
    chosen: Completion
    rejected: Completion
    probability: float = 1.0
    """the oracle's probability that `chosen` beats `rejected`"""


@dataclass
class TrainBatch:
    """Padded tensors for the learner. Prompt and response are concatenated and right-padded.

    `response_mask[b, t]` is 1 where `input_ids[b, t]` is a response token, so per-token arrays below are
    aligned with `input_ids`: position t holds the value for predicting token t (from the logits at t-1).
    """

    input_ids: torch.Tensor
    """prompt + response token ids, right-padded, [B, T] long"""
    attention_mask: torch.Tensor
    """1 for real tokens, 0 for padding, [B, T] long"""
    response_mask: torch.Tensor
    """1 for response tokens that are trained on, [B, T] float"""
    advantages: torch.Tensor
    """per-sequence advantage, [B] float; or per-token, [B, T] float (PPO's GAE advantages, 0 off the mask)"""
    engine_logprobs: torch.Tensor
    """the engine's logprob of each response token when it was sampled, [B, T] float (0 off the mask)"""
    rewards: torch.Tensor | None = None
    """per-sequence reward, [B] float (for logging)"""
    old_logprobs: torch.Tensor | None = None
    """logprobs under the policy before this iteration's updates, [B, T] float; filled by the learner"""
    ref_logprobs: torch.Tensor | None = None
    """logprobs under the reference model, [B, T] float; filled by the learner when a KL term is on"""
    old_values: torch.Tensor | None = None
    """the critic's values when the samples were drawn, [B, T] float (PPO only; 0 off the mask)"""
    returns: torch.Tensor | None = None
    """the critic's regression targets, GAE advantages + old values, [B, T] float (PPO only; 0 off the mask)"""
    group_index: torch.Tensor | None = None
    """which prompt each row answers, [B] long: rows with the same index form a group (group baselines)"""
    sampled_by_reference: torch.Tensor | None = None
    """1.0 for rows the reference policy sampled, else 0.0, [B] float (XPO's exploration term); None: none did"""
    turn_rewards: torch.Tensor | None = None
    """multi-turn episodes only: each turn's reward on that turn's last policy token, [B, T] float (0 elsewhere);
    objectives with per-token rewards (PPO) use it instead of `rewards` on the last token"""
    position_ids: torch.Tensor | None = None
    """packed rows only (several sequences in one row): each token's position within its own sequence, restarting
    at 0 where a sequence starts, [B, T] long. When set, the model gets these positions and no 2-D attention
    mask, so transformers masks attention per sequence (block-diagonal) and no sequence sees another"""

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        """The rows at `index`, as a new TrainBatch sharing storage where torch allows."""
        def pick(t):
            return None if t is None else t[index]
        return TrainBatch(**{name: pick(getattr(self, name)) for name in self.__dataclass_fields__})

    def to(self, device: torch.device | str) -> "TrainBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)
        return TrainBatch(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})
