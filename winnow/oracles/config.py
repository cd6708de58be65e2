"""What judges a run's responses: `OracleConfig`, one field (`kind`) that chooses, one nested config per kind.

    --oracle.kind rule          --oracle.rule.rewards math boxed_format --oracle.rule.reward-weights 1 0.1
    --oracle.kind remote        --oracle.remote.url http://127.0.0.1:8000 (a `winnow serve-oracle` service)
    --oracle.kind reward_model  --oracle.reward-model.path DIR (a sequence-classification model)
    --oracle.kind judge         --oracle.judge.model gpt-4o-mini (an OpenAI-compatible chat API)
    --oracle.kind pairwise      --oracle.pairwise.path DIR (a pairwise preference model: `winnow train rm --kind pairwise`)

Only the chosen kind's settings are used. A setting of another kind that differs from the command's default
is a mistake (the run would silently ignore it), and `check_oracle_config` says so before anything loads.

The flat names of the previous release (`--oracle.rewards`, `--oracle.url`, `--oracle.reward-model-path`,
`--oracle.judge-model`, ...) stay accepted for one release: `OracleConfig.config_aliases` maps each to its new
place, and `winnow.config` applies the table to flags and config files. A run writes the new, nested form.

Pure Python: the math grader's worker processes and the oracle service's ingress workers import this
module, and should not pay for torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable, Literal

OracleKind = Literal["rule", "remote", "reward_model", "judge", "pairwise"]
ORACLE_KINDS: tuple[str, ...] = ("rule", "remote", "reward_model", "judge", "pairwise")
"""the values of `OracleConfig.kind`"""

Need = Literal["reward", "compare"]
"""what a caller asks of an oracle: a scalar reward per response, or P(a beats b) for a pair"""
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "rule": ("reward", "compare"),          # compare: Bradley-Terry on the rewards
    "remote": ("reward", "compare"),        # compare: Bradley-Terry on the served rewards
    "reward_model": ("reward", "compare"),  # compare: Bradley-Terry on the model's scores
    "judge": ("compare",),                  # a pairwise verdict, no scalar
    "pairwise": ("compare",),               # P(a beats b) read off both responses at once, no scalar
}
SERVED_PAIRWISE = "served_pairwise"
"""the capabilities' name for kind=remote with --oracle.remote.pairwise (a served pairwise model): compare only"""
CAPABILITIES[SERVED_PAIRWISE] = ("compare",)


@dataclass
class RuleOracleConfig:
    """kind=rule: reward functions in the actor's process, combined with weights."""

    rewards: list[str] = field(default_factory=lambda: ["exact"])
    """reward functions: builtins (math, exact, boxed_format, closeness), 'module:function' or 'file.py:function'"""
    reward_weights: list[float] | None = None
    """one weight per reward, the total is their weighted sum; None weighs each 1.0"""
    math_timeout_s: float = 5.0
    """seconds to grade one math answer; one that takes longer is unscored (and retried once)"""
    math_num_workers: int = 2
    """processes grading math answers in parallel"""

    def problems(self) -> list[str]:
        problems = []
        if not self.rewards:
            problems.append("rule.rewards is empty; name at least one (e.g. exact or math)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards "
                            f"{self.rewards}; give one weight per reward, in the same order")
        if self.math_timeout_s <= 0:
            problems.append(f"rule.math_timeout_s={self.math_timeout_s} must be > 0")
        if self.math_num_workers < 1:
            problems.append(f"rule.math_num_workers={self.math_num_workers} must be >= 1")
        return problems


@dataclass
class RemoteOracleConfig:
    """kind=remote: a client of an oracle service (`winnow serve-oracle`); the service's rewards score."""

    url: str | None = None
    """the service, e.g. http://127.0.0.1:8000"""
    token_env: str = "WINNOW_ORACLE_TOKEN"
    """environment variable holding the service's token (a flag would show it in `ps`); unset: send none"""
    timeout_s: float = 60.0
    """seconds to wait for one request's reply before retrying it"""
    give_up_after_s: float = 600.0
    """seconds the service may stay unreachable (the actor paused, retrying) before the run stops with an error"""
    max_in_flight: int = 4
    """requests to the service in flight at once"""
    request_batch_size: int = 64
    """completions per request; the service batches requests from all clients on top of this"""
    pairwise: bool = False
    """the service serves a pairwise preference model (`winnow serve-oracle --oracle.kind pairwise`): pairs are
    compared on the service (POST /compare), and it gives no rewards"""

    def problems(self) -> list[str]:
        problems = []
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            problems.append(f"remote.url={self.url!r} must start with http:// or https://")
        if self.timeout_s <= 0 or self.give_up_after_s <= 0 or self.max_in_flight < 1 or self.request_batch_size < 1:
            problems.append("remote.timeout_s and remote.give_up_after_s must be > 0, remote.max_in_flight and "
                            "remote.request_batch_size >= 1")
        return problems


@dataclass
class RewardModelOracleConfig:
    """kind=reward_model: a `transformers` sequence-classification model in the actor's process."""

    path: str | None = None
    """a directory (or hub id) with the model and its tokenizer, saved with `save_pretrained`"""
    batch_size: int = 32
    """(prompt, response) pairs scored per forward pass"""
    max_length: int = 512
    """tokens of one (prompt, response) pair the model reads; longer pairs are truncated"""

    def problems(self) -> list[str]:
        if self.batch_size < 1 or self.max_length < 1:
            return [f"reward_model.batch_size={self.batch_size} and reward_model.max_length={self.max_length} "
                    f"must be >= 1"]
        return []


@dataclass
class JudgeOracleConfig:
    """kind=judge: an LLM judge behind an OpenAI-compatible chat-completions API (compares, never scores)."""

    model: str = "gpt-4o-mini"
    """the model name sent to the chat-completions API"""
    base_url: str | None = None
    """the API's base URL, e.g. http://127.0.0.1:8000/v1 for a local vLLM server; None is OpenAI's"""
    api_key_env: str = "OPENAI_API_KEY"
    """the environment variable holding the API key (keys never go in configs or flags)"""
    max_concurrency: int = 8
    """the most API calls in flight at once"""
    timeout_s: float = 30.0
    """seconds before a call is abandoned and retried"""

    def problems(self) -> list[str]:
        problems = []
        if self.max_concurrency < 1:
            problems.append(f"judge.max_concurrency={self.max_concurrency} must be >= 1")
        if self.timeout_s <= 0:
            problems.append(f"judge.timeout_s={self.timeout_s} must be > 0")
        return problems


@dataclass
class PairwiseOracleConfig:
    """kind=pairwise: a pairwise preference model in the actor's process (`winnow.oracles.pairwise`): it reads the
    prompt and both responses and gives P(a beats b), symmetric by construction."""

    path: str | None = None
    """a directory saved by `winnow train rm --kind pairwise` (a sequence-classification model and its tokenizer)"""
    batch_size: int = 32
    """rows (one pair in one order) per forward pass; each comparison reads its pair in both orders"""
    max_length: int = 512
    """tokens of one (prompt, a [SEP] b) row the model reads; longer rows are truncated"""

    def problems(self) -> list[str]:
        if self.batch_size < 1 or self.max_length < 1:
            return [f"pairwise.batch_size={self.batch_size} and pairwise.max_length={self.max_length} must be >= 1"]
        return []


KIND_CONFIGS: dict[str, type] = {"rule": RuleOracleConfig, "remote": RemoteOracleConfig,
                                 "reward_model": RewardModelOracleConfig, "judge": JudgeOracleConfig,
                                 "pairwise": PairwiseOracleConfig}
"""each kind's nested config; `OracleConfig` holds one of each, under the kind's name"""


@dataclass
class OracleConfig:
    """What judges responses: `kind` chooses the oracle, and only that kind's settings are used."""

    kind: OracleKind = "rule"
    """the oracle: rule (reward functions), remote (an oracle service), reward_model (a sequence-classification
    model) or judge (an LLM judge; compares only, so not for RL)"""
    max_retries: int = 2
    """times to retry a reward function that raised or a judge call that failed, before the item goes unscored"""
    preference_temperature: float = 1.0
    """Bradley-Terry temperature when scores become preferences: P(a beats b) = sigmoid((r_a - r_b) / temperature)"""
    rule: RuleOracleConfig = field(default_factory=RuleOracleConfig)
    """kind=rule: reward functions in the actor's process"""
    remote: RemoteOracleConfig = field(default_factory=RemoteOracleConfig)
    """kind=remote: an oracle service (`winnow serve-oracle`)"""
    reward_model: RewardModelOracleConfig = field(default_factory=RewardModelOracleConfig)
    """kind=reward_model: a sequence-classification model in the actor's process"""
    judge: JudgeOracleConfig = field(default_factory=JudgeOracleConfig)
    """kind=judge: an LLM judge over an OpenAI-compatible API"""
    pairwise: PairwiseOracleConfig = field(default_factory=PairwiseOracleConfig)
    """kind=pairwise: a pairwise preference model in the actor's process"""

    config_aliases: ClassVar[dict[str, str]] = {
        "rewards": "rule.rewards", "reward_weights": "rule.reward_weights",
        "math_timeout_s": "rule.math_timeout_s", "math_num_workers": "rule.math_num_workers",
        "url": "remote.url", "token_env": "remote.token_env", "timeout_s": "remote.timeout_s",
        "give_up_after_s": "remote.give_up_after_s", "max_in_flight": "remote.max_in_flight",
        "request_batch_size": "remote.request_batch_size",
        "reward_model_path": "reward_model.path", "reward_model_batch_size": "reward_model.batch_size",
        "judge_model": "judge.model", "judge_base_url": "judge.base_url", "judge_api_key_env": "judge.api_key_env",
        "judge_max_concurrency": "judge.max_concurrency", "judge_timeout_s": "judge.timeout_s",
    }
    """the previous release's flat names (flags and config-file keys) -> their new place; kept for one release"""
    config_alias_implies: ClassVar[dict[str, dict[str, Any]]] = {"url": {"kind": "remote"}}
    """what an old name also meant when given a value: a url chose the remote oracle"""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ORACLE_KINDS:
            problems.append(f"kind={self.kind!r} must be one of {', '.join(ORACLE_KINDS)}")
        if self.max_retries < 0:
            problems.append(f"max_retries={self.max_retries} must be >= 0")
        if not self.preference_temperature > 0:
            problems.append(f"preference_temperature={self.preference_temperature} must be > 0")
        for kind in ORACLE_KINDS:
            problems += getattr(self, kind).problems()
        if self.kind == "remote" and self.remote.url is None:
            problems.append("kind='remote' needs --oracle.remote.url (the service, e.g. http://127.0.0.1:8000)")
        if self.kind == "reward_model" and not self.reward_model.path:
            problems.append("kind='reward_model' needs --oracle.reward-model.path (a sequence-classification model)")
        if self.kind == "pairwise" and not self.pairwise.path:
            problems.append("kind='pairwise' needs --oracle.pairwise.path (a model from winnow train rm --kind pairwise)")
        if problems:
            raise ValueError("invalid OracleConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OracleConfig:
        """The inverse of `dataclasses.asdict` (new, nested form only)."""
        return cls(**{k: KIND_CONFIGS[k](**v) if k in KIND_CONFIGS else v for k, v in data.items()})


def unused_oracle_settings(config: OracleConfig, default: OracleConfig) -> list[str]:
    """The flags (`--oracle.reward-model.path`, ...) set under kinds `config` does not use: each sub-config of a
    kind other than `config.kind` is compared, field by field, with `default`'s, the command's own default.

    Relative to the command's default, not the dataclass's: preference runs default to the `closeness` rule,
    RL runs to `exact`, and neither default is a setting the user made."""
    return [flag for flag, _, _ in _unused(config, default)]


def check_oracle_config(config: OracleConfig, *, default: OracleConfig, needs: Need | Iterable[Need]) -> None:
    """Raise ValueError, naming the flags, when the oracle can't do what the command `needs`, or when the config
    sets another kind's settings (see `unused_oracle_settings`). Command builders call it before loading anything."""
    check_capability(capability_kind(config), needs)
    unused = _unused(config, default)
    if unused:
        old_names = {f"--oracle.{_flag(new)}": f"--oracle.{_flag(old)}"
                     for old, new in OracleConfig.config_aliases.items()}
        settings = "; ".join(f"{flag} {_show(value)}" + (f" (old name {old_names[flag]})" if flag in old_names else "")
                             for flag, _, value in unused)
        kinds = " / ".join(dict.fromkeys(kind for _, kind, _ in unused))
        raise ValueError(f"--oracle.kind {config.kind} does not use {settings}. These settings belong to --oracle.kind "
                         f"{kinds}: choose that oracle with --oracle.kind, or drop them")


def _unused(config: OracleConfig, default: OracleConfig) -> list[tuple[str, str, Any]]:
    """(flag, kind, value) of each setting `unused_oracle_settings` reports."""
    unused = []
    for kind in ORACLE_KINDS:
        if kind != config.kind:
            settings, baseline = getattr(config, kind), getattr(default, kind)
            unused += [(f"--oracle.{_flag(kind)}.{_flag(f.name)}", kind, getattr(settings, f.name))
                       for f in fields(settings) if getattr(settings, f.name) != getattr(baseline, f.name)]
    return unused


def capability_kind(config: OracleConfig) -> str:
    """The key of `CAPABILITIES` that says what `config`'s oracle can do: its kind, except that a remote oracle
    serving a pairwise model (--oracle.remote.pairwise) compares only."""
    return SERVED_PAIRWISE if config.kind == "remote" and config.remote.pairwise else config.kind


def check_capability(kind: str, needs: Need | Iterable[Need]) -> None:
    """Raise ValueError when an oracle of `kind` can't give what the caller `needs`."""
    needs = (needs,) if isinstance(needs, str) else tuple(needs)
    for need in needs:
        if need not in ("reward", "compare"):
            raise ValueError(f"needs={need!r}: an oracle gives a 'reward' or can 'compare'")
    if "reward" in needs and "reward" not in CAPABILITIES[kind]:
        raise ValueError(
            f"--oracle.kind {_kind_flag(kind)} only compares responses; this run needs a scalar reward per response (RL, "
            f"--pairs.selection best_vs_worst, accuracy): use --oracle.kind rule, remote or reward_model (or, for "
            f"dpo/ipo/slic/simpo, --pairs.selection random)")


def _kind_flag(kind: str) -> str:
    return "remote --oracle.remote.pairwise" if kind == SERVED_PAIRWISE else kind


def _flag(dotted: str) -> str:
    return dotted.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)
