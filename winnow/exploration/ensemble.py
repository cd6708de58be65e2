"""SEA's epistemic reward model: an ensemble of small MLPs on frozen features, trained online on the oracle's
labels with a Bradley-Terry loss and a regulariser that pulls each member towards its own random
initialisation (Liu et al. 2024, "Sample-Efficient Alignment for LLMs", arXiv 2411.01493, §4; the seed
framework's `EnnBTL`).

Each member e is an MLP d -> H -> H -> 1 (ReLU). The members differ only by their random initialisation
theta0_e; their disagreement is the model's epistemic uncertainty, which the selection rules
(`winnow.exploration.sea`) read. The regulariser lambda * (B / N_q) * mean((theta - theta0)^2) is the
Gaussian prior of a Bayesian posterior whose weight shrinks as the number of oracle queries N_q grows (a
randomised-prior ensemble, Osband et al. 2018): early on the members stay near their different priors
(they disagree), later the data dominate (they agree where there are data).
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from winnow.exploration.ensemble_config import EnsembleConfig
from winnow.lazy import lazy_import, no_grad

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def truncated_normal_(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Fill `t` from N(0, std^2) truncated at +-2 std (by redrawing the outliers)."""
    with torch.no_grad():
        t.normal_(0.0, std, generator=generator)
        while True:
            outside = t.abs() > 2 * std
            if not outside.any():
                return t
            t[outside] = torch.empty(int(outside.sum())).normal_(0.0, std, generator=generator)


class EnsembleRewardModel(torch.nn.Module):
    """E MLPs evaluated together as batched matrix products: `forward(features [M, d]) -> rewards [E, M]`."""

    def __init__(self, input_size: int, num_members: int = 20, hidden_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        sizes = [input_size, hidden_size, hidden_size, 1]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = truncated_normal_(torch.empty(num_members, fan_in, fan_out), 1 / (2 * math.sqrt(fan_in)), generator)
            self.weights.append(torch.nn.Parameter(w))                           # [E, in, out]
            self.biases.append(torch.nn.Parameter(torch.zeros(num_members, 1, fan_out)))  # [E, 1, out]
        # theta0: each member's initial parameters, the centre of its regulariser (a buffer: never trained).
        self.register_buffer("initial", self.flat_parameters().detach().clone())  # [num_params]

    @property
    def num_members(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, features: Tensor) -> Tensor:
        """features [M, d] -> rewards [E, M]."""
        h = features.float().unsqueeze(0).expand(self.num_members, -1, -1)  # [E, M, d]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)                                          # [E, M, out]
            if i < len(self.weights) - 1:
                h = F.relu(h)
        return h.squeeze(-1)

    def flat_parameters(self) -> Tensor:
        """All parameters as one vector [num_params] (the regulariser's theta)."""
        return torch.cat([p.reshape(-1) for p in self.parameters()])


def ensemble_loss(model: EnsembleRewardModel, chosen: Tensor, rejected: Tensor, *, reg_lambda: float,
                  reg_scale: float) -> tuple[Tensor, dict[str, float]]:
    """The ensemble's loss on a batch of labelled pairs, features [P, d] each:
    mean over members and pairs of -log sigmoid(r_e(y+) - r_e(y-))  +  lambda * reg_scale * mean((theta - theta0)^2),
    with reg_scale = B / N_q (or 1 for the fixed regulariser)."""
    margins = model(chosen) - model(rejected)                               # [E, P]
    fit = -F.logsigmoid(margins).mean()
    reg = (model.flat_parameters() - model.initial).pow(2).mean()
    loss = fit + reg_lambda * reg_scale * reg
    return loss, {"sea/rm_loss": fit.item(), "sea/rm_reg": reg.item()}


class ReplayBuffer:
    """The last `capacity` labelled pairs as (chosen features, rejected features), sampled uniformly."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.chosen: list[Tensor] = []
        self.rejected: list[Tensor] = []
        self.next = 0
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.chosen)

    def add(self, chosen: Tensor, rejected: Tensor) -> None:
        """One pair's features, [d] each; the oldest pair goes once the buffer is full."""
        if len(self.chosen) < self.capacity:
            self.chosen.append(chosen)
            self.rejected.append(rejected)
        else:
            self.chosen[self.next], self.rejected[self.next] = chosen, rejected
        self.next = (self.next + 1) % self.capacity

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """`batch_size` distinct pairs drawn uniformly: ([B, d], [B, d])."""
        rows = self.rng.sample(range(len(self.chosen)), batch_size)
        return torch.stack([self.chosen[r] for r in rows]), torch.stack([self.rejected[r] for r in rows])

    def state_dict(self) -> dict:
        """The pairs in slot order ([P, d] each, None when empty), the next slot to overwrite, the rng."""
        stacked = (torch.stack(self.chosen), torch.stack(self.rejected)) if self.chosen else (None, None)
        return {"chosen": stacked[0], "rejected": stacked[1], "next": self.next, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.chosen = [] if state["chosen"] is None else list(state["chosen"])
        self.rejected = [] if state["rejected"] is None else list(state["rejected"])
        self.next = state["next"]
        self.rng.setstate(state["rng"])


class EpistemicRewardModel:
    """The ensemble, its optimizer and its replay buffer: `add` labelled pairs, `train` a few steps, `rewards`."""

    def __init__(self, input_size: int, config: EnsembleConfig, seed: int = 0) -> None:
        self.config = config
        self.model = EnsembleRewardModel(input_size, config.num_members, config.hidden_size, seed=seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.buffer = ReplayBuffer(config.buffer_size, seed=seed)
        self.num_queries = 0

    def state_dict(self) -> dict:
        """Everything the next `train` and `rewards` depend on: the members' parameters and their initial
        parameters theta0 (a buffer of the module), Adam's moments, the replay buffer and N_q."""
        return {"input_size": self.model.weights[0].shape[1], "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "num_queries": self.num_queries}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.num_queries = state["num_queries"]

    @no_grad
    def rewards(self, features: Tensor) -> Tensor:
        """features [M, d] -> each member's reward [E, M]."""
        return self.model(features)

    def add(self, chosen: Tensor, rejected: Tensor, num_queries: int) -> None:
        """Labelled pairs [P, d] each, and the oracle queries they cost (N_q of the regulariser)."""
        for c, r in zip(chosen, rejected):
            self.buffer.add(c, r)
        self.num_queries += num_queries

    def train(self) -> dict[str, float]:
        """`steps_per_iteration` steps on replayed batches; nothing until the buffer holds `batch_size` pairs."""
        cfg = self.config
        if len(self.buffer) < cfg.batch_size:
            return {}
        scale = 1.0 if cfg.fixed_reg else cfg.batch_size / max(self.num_queries, 1)
        metrics: dict[str, float] = {}
        for _ in range(cfg.steps_per_iteration):
            chosen, rejected = self.buffer.sample(cfg.batch_size)
            loss, metrics = ensemble_loss(self.model, chosen, rejected, reg_lambda=cfg.reg_lambda, reg_scale=scale)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return metrics
