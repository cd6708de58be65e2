"""Preference losses against values worked out by hand, and the objects' pairing and length averaging."""
from __future__ import annotations

import math

import pytest
import torch

from winnow.algorithms import DPO, IPO, PREFERENCE_OBJECTIVES, SimPO, SLiC, dpo_loss, ipo_loss, simpo_loss, slic_loss
from winnow.types import TrainBatch

# Three pairs. Delta = (pi_w - pi_l) - (ref_w - ref_l):
#   pair 0: (-1 - -3) - (-2 - -2) = 2;  pair 1: (-2 - -2) - (-1 - -1) = 0;  pair 2: (-3 - -1) - 0 = -2
PI_W, PI_L = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-3.0, -2.0, -1.0])
REF_W, REF_L = torch.tensor([-2.0, -1.0, -2.0]), torch.tensor([-2.0, -1.0, -2.0])


def _softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)"""
    return math.log1p(math.exp(x))


def test_dpo_loss_by_hand():
    # beta = 0.5: beta*Delta = 1, 0, -1 -> -log sigma(z) = log(1 + e^-z) = 0.31326, log 2 = 0.69315, 1.31326
    expected = [_softplus(-1), math.log(2), _softplus(1)]
    assert dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(0.313262, abs=1e-6)


def test_dpo_label_smoothing_by_hand():
    # eps = 0.1, beta*Delta = 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    out = dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5, label_smoothing=0.1)
    assert out[0].item() == pytest.approx(0.413262, abs=1e-6)
    # At Delta = 0 both terms are log 2 whatever eps is.
    assert out[1].item() == pytest.approx(math.log(2), abs=1e-6)


def test_ipo_loss_by_hand():
    # beta = 0.5: target 1/(2 beta) = 1; (2 - 1)^2 = 1, (0 - 1)^2 = 1, (-2 - 1)^2 = 9
    assert ipo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5).tolist() == pytest.approx([1.0, 1.0, 9.0])
    # beta = 0.25: target 2, so pair 0 is exactly on target
    assert ipo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.25)[0].item() == pytest.approx(0.0)


def test_slic_loss_by_hand():
    # beta = 0.5: max(0, 1 - 0.5*Delta) = max(0, 0) = 0, 1, max(0, 2) = 2
    assert slic_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5).tolist() == pytest.approx([0.0, 1.0, 2.0])


def test_simpo_loss_by_hand():
    # beta = 2, gamma/beta = 0.5: z = 2*(pi_w - pi_l) - 1 = 3, -1, -5 -> log(1 + e^-z)
    expected = [_softplus(-3), _softplus(1), _softplus(5)]
    assert simpo_loss(PI_W, PI_L, beta=2.0, gamma_beta_ratio=0.5).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(0.048587, abs=1e-6)


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo"])
def test_gradient_raises_the_chosen_and_lowers_the_rejected(name):
    """At Delta = 0 every loss is still active: descending it must raise pi_w and lower pi_l."""
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    ref = torch.tensor([-2.0])
    objective = PREFERENCE_OBJECTIVES[name]()
    objective.pair_losses(chosen, rejected, ref, ref).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def _pair_batch(with_ref: bool = True) -> tuple[TrainBatch, torch.Tensor]:
    """Two pairs, rows [chosen_0, rejected_0, chosen_1, rejected_1]; prompt is column 0, responses after.

    per-token logprobs (response columns 1..2):      sum   mean
      chosen_0   [-1, -1]                              -2    -1
      rejected_0 [-3, pad]                             -3    -3
      chosen_1   [-0.5, -1.5]                          -2    -1
      rejected_1 [-2, -2]                              -4    -2
    reference: every response token -1 (sums -2, -1, -2, -2; means -1 each)
    """
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float32)
    logprobs = torch.tensor([[0, -1, -1], [0, -3, 0], [0, -0.5, -1.5], [0, -2, -2]], dtype=torch.float32)
    batch = TrainBatch(
        input_ids=torch.zeros(4, 3, dtype=torch.long), attention_mask=mask.long() + torch.tensor([1, 0, 0]),
        response_mask=mask, advantages=torch.zeros(4), engine_logprobs=torch.zeros(4, 3),
        ref_logprobs=-mask if with_ref else None,
    )
    return batch, logprobs


def test_dpo_object_uses_summed_logprobs():
    # Delta_0 = (-2 - -3) - (-2 - -1) = 2, Delta_1 = (-2 - -4) - (-2 - -2) = 2; beta = 0.5 -> both log(1 + e^-1)
    batch, logprobs = _pair_batch()
    loss, metrics = DPO(beta=0.5).loss(logprobs, batch, num_sequences=4, num_tokens=7)
    assert loss.item() == pytest.approx(_softplus(-1), abs=1e-6)
    assert metrics["pref/reward_margin"] == pytest.approx(1.0)  # beta * mean Delta
    assert metrics["pref/reward_accuracy"] == pytest.approx(1.0)
    assert metrics["pref/chosen_logps"] == pytest.approx(-2.0)
    assert metrics["pref/rejected_logps"] == pytest.approx(-3.5)


def test_ipo_and_simpo_objects_use_length_averaged_logprobs():
    batch, logprobs = _pair_batch()
    # IPO means: Delta_0 = (-1 - -3) - 0 = 2, Delta_1 = (-1 - -2) - 0 = 1; beta = 0.5, target 1: (1^2 + 0^2)/2
    loss, _ = IPO(beta=0.5).loss(logprobs, batch, num_sequences=4, num_tokens=7)
    assert loss.item() == pytest.approx(0.5)
    # SimPO means, no reference: beta = 1, gamma/beta = 1: z = 2 - 1 = 1 and 1 - 1 = 0
    loss, _ = SimPO(beta=1.0, gamma_beta_ratio=1.0).loss(logprobs, _pair_batch(with_ref=False)[0],
                                                         num_sequences=4, num_tokens=7)
    assert loss.item() == pytest.approx((_softplus(-1) + math.log(2)) / 2, abs=1e-6)
    # SLiC sums: Delta = 2, 2; beta = 0.25 -> max(0, 1 - 0.5) = 0.5 each
    loss, _ = SLiC(beta=0.25).loss(logprobs, batch, num_sequences=4, num_tokens=7)
    assert loss.item() == pytest.approx(0.5)


def test_micro_batch_losses_sum_to_the_mini_batch_loss():
    batch, logprobs = _pair_batch()
    whole, _ = DPO(beta=0.3).loss(logprobs, batch, num_sequences=4, num_tokens=7)
    parts = [DPO(beta=0.3).loss(logprobs[rows], batch.select(rows), num_sequences=4, num_tokens=7)[0]
             for rows in (slice(0, 2), slice(2, 4))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_a_split_pair_and_a_missing_reference_are_errors():
    batch, logprobs = _pair_batch()
    with pytest.raises(ValueError, match="even learner.micro_batch_size"):
        DPO().loss(logprobs[:3], batch.select(slice(0, 3)), num_sequences=4, num_tokens=7)
    with pytest.raises(ValueError, match="needs batch.ref_logprobs"):
        DPO().loss(logprobs, _pair_batch(with_ref=False)[0], num_sequences=4, num_tokens=7)
    with pytest.raises(ValueError, match="beta"):
        IPO(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(label_smoothing=0.5)
    assert not SimPO().needs_reference and DPO().needs_reference
