"""The reward model's loss: Bradley-Terry on (chosen, rejected) scores, with an optional margin and centring term.

    loss = mean_p[ -log sigmoid(r_c - r_r - m) ] + centring_coef * mean_p[ (r_c + r_r)^2 ]

Bradley-Terry as in Ouyang et al. 2022 (InstructGPT, eq. 1). The margin m (a per-pair column, 0 when absent) asks
the chosen score to win by at least that much where the data say how strongly it is preferred (Llama 2, Touvron
et al. 2023, eq. 2). The centring term (Eisenstein et al. 2023, "Helping or Herding?") pins the otherwise free
offset of the scores near zero: Bradley-Terry sees only differences, so without it the scores can drift, and a
policy trained on them sees a reward whose scale means nothing.
"""
from __future__ import annotations

from winnow.lazy import lazy_import

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                       centring_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The pair loss of `chosen` [P] and `rejected` [P] scores (float), mean over the P pairs, and its metrics:
    `rm/accuracy` (fraction of pairs with r_c > r_r; a tie counts as wrong), `rm/margin` (mean r_c - r_r),
    `rm/score_mean` (mean of all 2P scores), `rm/bt_loss` (the Bradley-Terry part alone)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be [P]")
    difference = chosen - rejected  # [P]
    target = difference if margin is None else difference - margin
    bt = -F.logsigmoid(target).mean()
    loss = bt + centring_coef * ((chosen + rejected) ** 2).mean() if centring_coef else bt
    with torch.no_grad():
        metrics = {"rm/accuracy": float((difference > 0).float().mean()), "rm/margin": float(difference.mean()),
                   "rm/score_mean": float(torch.cat([chosen, rejected]).mean()), "rm/bt_loss": float(bt)}
    return loss, metrics
