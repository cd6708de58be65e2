"""The critic of PPO: a value model V(prefix) and the learner that trains it.

The value model is a separate copy of the policy's backbone (the transformer without its LM head) with a
scalar head, `Linear(hidden, 1)`. Separate rather than a second head on the policy because (1) the value
loss then cannot disturb the policy's representation, the usual recommendation for LLM PPO (Huang et al.
2024, "The N+ Implementation Details of RLHF with PPO"); (2) the policy stays a plain `transformers`
model, so weight sync to the engine, saving and the sharded strategies are unchanged; (3) it gets its own
learning rate and optimizer state. The cost is a second model in memory.

The critic is trained by an ordinary `Learner` whose forward is `token_values` instead of
`sequence_logprobs`: micro-batches, gradient accumulation, AdamW, schedule and clipping are shared.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from winnow.lazy import lazy_import
from winnow.learner.learner import Learner, LearnerConfig
from winnow.types import TrainBatch

torch = lazy_import("torch")
nn = lazy_import("torch.nn")


class ValueModel(nn.Module):
    """A transformer backbone and a scalar head: one value per position."""

    def __init__(self, backbone: nn.Module, hidden_size: int, head_init_std: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # Zero (or small) initialisation: V starts at ~0 everywhere instead of a random function of the
        # hidden state, so the first advantages are the rewards themselves, not noise.
        if head_init_std > 0:
            nn.init.normal_(self.head.weight, std=head_init_std)
        else:
            nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module, head_init_std: float = 0.0) -> "ValueModel":
        """A copy of `policy`'s backbone (`base_model` of a `transformers` causal LM: its weights, not its
        LM head) under a fresh head."""
        backbone = getattr(policy, "base_model", None)
        if backbone is None or backbone is policy:
            raise ValueError(f"{type(policy).__name__} has no `base_model` to copy: the critic needs a "
                             "`transformers` causal LM (a backbone under an LM head)")
        return cls(copy.deepcopy(backbone), policy.config.hidden_size, head_init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """V of the prefix ending at each position, `[B, T]` float32 (the head runs in float32)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # [B, T, H]
        return self.head(hidden.float()).squeeze(-1)  # [B, T]

    def get_decoder(self) -> nn.Module:
        """The backbone, whose decoder layers `--learner.compile` compiles (as for the policy)."""
        return self.backbone

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """The backbone as a `transformers` checkpoint, and the head beside it in `value_head.pt`."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        torch.save(self.head.state_dict(), path / "value_head.pt")


def token_values(model: ValueModel, batch: TrainBatch) -> torch.Tensor:
    """The critic's value of each response token, `[B, T]` float32, aligned like `TrainBatch.response_mask`.

    Position t holds V(input_ids[:t]), the value of the state in which token t is chosen, read from the
    hidden state at t - 1 (exactly where `sequence_logprobs` reads token t's logits); 0 off the mask.
    """
    positions = batch.attention_mask.cumsum(-1).clamp(min=1) - 1
    per_position = model(batch.input_ids, batch.attention_mask, positions)  # [B, T], V after reading token t
    out = torch.zeros_like(per_position)
    out[:, 1:] = per_position[:, :-1]
    return out * batch.response_mask


def make_critic(
    policy: nn.Module, config: LearnerConfig, *, lr: float, total_steps: int, device=None,
    head_init_std: float = 0.0,
) -> Learner:
    """A `Learner` that trains a `ValueModel` copied from `policy`, with `config` but learning rate `lr`.

    Call it before the policy's learner is built (a sharded strategy splits the policy in place).
    """
    if config.strategy != "single":
        raise ValueError(
            f"learner.strategy={config.strategy!r}: PPO's critic (a second trainable model) runs with the "
            f"'single' strategy only so far; use --learner.strategy single for ppo, or a critic-free objective "
            f"(grpo, dr-grpo, rloo) with {config.strategy}"
        )
    value_model = ValueModel.from_policy(policy, head_init_std)
    return Learner(value_model, dataclasses.replace(config, lr=lr), total_steps, device=device,
                   forward=token_values)
