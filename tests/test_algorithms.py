"""CPU math tests for winnow.algorithms. Every expected number is worked out by hand in the comments."""
import math

import pytest
import torch

from winnow.algorithms import (
    GRPO,
    OBJECTIVES,
    PPO,
    RLOO,
    DrGRPO,
    PolicyObjective,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    rloo_advantages,
)
from winnow.types import TrainBatch

E = math.e


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def make_batch(advantages, response_mask, *, engine_logprobs=None, old_logprobs=None, ref_logprobs=None):
    mask = torch.tensor(response_mask, dtype=torch.float32)
    return TrainBatch(
        input_ids=torch.zeros(mask.shape, dtype=torch.long),
        attention_mask=torch.ones(mask.shape, dtype=torch.long),
        response_mask=mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        engine_logprobs=torch.zeros(mask.shape) if engine_logprobs is None else engine_logprobs,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


# ---------------------------------------------------------------------------------------- advantages

def test_group_advantages_two_groups_with_std():
    # group 1: [1, 2, 6], mean 3, centred [-2, -1, 3]
    #   population std = sqrt((4 + 1 + 9) / 3) = sqrt(14/3) = 2.1602469
    #   advantages = [-2, -1, 3] / (2.1602469 + 1e-6) = [-0.9258196, -0.4629098, 1.3887294]
    # group 2: [0.11, 0.11, 0.11], all equal -> exactly [0, 0, 0]. In float32 mean([0.11]*3) != 0.11: the
    #   centred values are 7.45e-9, not 0, and dividing by (std 0 + 1e-6) would give advantages of 0.00745
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.11, 0.11, 0.11])
    adv = group_advantages(rewards, group_size=3, scale_by_std=True)
    close(adv[:3], [-0.9258196, -0.4629098, 1.3887294])
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_two_groups_without_std():
    # Dr. GRPO: only centred. group 1 -> [-2, -1, 3]; group 2 (all 0.11) -> exactly 0
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.11, 0.11, 0.11])
    adv = group_advantages(rewards, group_size=3, scale_by_std=False)
    close(adv[:3], [-2.0, -1.0, 3.0])
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_binary_rewards_and_flat_groups_are_exact_zero():
    # group [1, 0, 0, 1]: mean 0.5, centred [0.5, -0.5, -0.5, 0.5], population std 0.5
    #   -> 0.5 / 0.500001 = 0.999998
    # groups [0.0]*4 and [0.11]*4: all equal -> exactly 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] + [0.0] * 4 + [0.11] * 4)
    adv = group_advantages(rewards, group_size=4, scale_by_std=True)
    close(adv[:4], [0.999998, -0.999998, -0.999998, 0.999998])
    assert adv[4:].tolist() == [0.0] * 8


def test_group_advantages_group_of_one_is_zero_not_nan():
    # population std of one sample is 0 (the sample std would be 0/0 = NaN)
    adv = group_advantages(torch.tensor([3.0, -1.0]), group_size=1, scale_by_std=True)
    assert adv.tolist() == [0.0, 0.0]


def test_group_advantages_integer_rewards_become_float():
    adv = group_advantages(torch.tensor([0, 2]), group_size=2, scale_by_std=False)
    assert adv.dtype == torch.float32 and adv.tolist() == [-1.0, 1.0]


def test_rloo_advantages_by_hand():
    # group [1, 2, 6]: A_1 = 1 - (2+6)/2 = -3, A_2 = 2 - (1+6)/2 = -1.5, A_3 = 6 - (1+2)/2 = 4.5
    #   (= 3/2 * centred [-2, -1, 3])
    # group [0, 0, 1]: A_1 = 0 - (0+1)/2 = -0.5, A_2 = -0.5, A_3 = 1 - 0 = 1
    # group [0.11]*3: exactly 0
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 1.0, 0.11, 0.11, 0.11])
    adv = rloo_advantages(rewards, group_size=3)
    close(adv[:6], [-3.0, -1.5, 4.5, -0.5, -0.5, 1.0])
    assert adv[6:].tolist() == [0.0, 0.0, 0.0]


def test_rloo_group_of_two():
    # [1, 0]: A_1 = 1 - 0 = 1, A_2 = 0 - 1 = -1
    close(rloo_advantages(torch.tensor([1.0, 0.0]), group_size=2), [1.0, -1.0])


@pytest.mark.parametrize(
    "rewards, group_size, message",
    [
        (torch.zeros(2, 3), 3, "1-D"),
        (torch.zeros(7), 3, "cannot be split"),
        (torch.zeros(6), 0, "group_size=0"),
    ],
)
def test_group_advantages_validation(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size, scale_by_std=True)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="RLOO needs >= 2"):
        rloo_advantages(torch.zeros(4), group_size=1)


# ---------------------------------------------------------------------------------------- KL

def test_kl_estimators_by_hand():
    # logp = log 0.5, ref = log 0.25: logp - ref = log 2 = 0.6931472
    #   k1 = log 2                      = 0.6931472
    #   k2 = 0.5 (log 2)^2              = 0.2402265
    #   k3 = exp(-log 2) + log 2 - 1    = 0.5 + 0.6931472 - 1 = 0.1931472
    # swapped, logp = log 0.25, ref = log 0.5: logp - ref = -log 2
    #   k1 = -0.6931472, k2 = 0.2402265, k3 = exp(log 2) - log 2 - 1 = 2 - 0.6931472 - 1 = 0.3068528
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    close(kl_estimate(logp, ref, "k1"), [0.6931472, -0.6931472])
    close(kl_estimate(logp, ref, "k2"), [0.2402265, 0.2402265])
    close(kl_estimate(logp, ref, "k3"), [0.1931472, 0.3068528])


def test_kl_equal_distributions_is_zero():
    logp = torch.tensor([[-0.3, -2.0]])
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp.clone(), kind).tolist() == [[0.0, 0.0]]


def test_k3_clamps_the_log_ratio():
    # ref - logp = 100 is clamped to 20: k3 = e^20 - 20 - 1 = 485165174.4 (finite, not inf);
    # ref - logp = -100 is clamped to -20: k3 = e^-20 + 20 - 1 = 19.000000002
    logp = torch.tensor([-100.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -100.0])
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    close(k3[0] / math.exp(20), 1.0)  # relative check: e^20 - 21 ~ e^20 (1 - 4e-8)
    close(k3[1], 19.0)
    k3.sum().backward()
    assert logp.grad.tolist() == [0.0, 0.0]  # saturated outside the clamp


def test_kl_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
UNEVEN_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # row 0: 2 tokens, row 1: 1 token


def test_token_mean():
    # (1 + 2 + 4) / 3 tokens = 7/3
    close(aggregate_loss(PER_TOKEN, UNEVEN_MASK, "token-mean"), 7 / 3)


def test_seq_mean_token_mean():
    # row 0: (1 + 2) / 2 = 1.5; row 1: 4 / 1 = 4; mean over 2 rows = 2.75
    close(aggregate_loss(PER_TOKEN, UNEVEN_MASK, "seq-mean-token-mean"), 2.75)


def test_seq_mean_token_sum_norm():
    # max_tokens = 4: row 0: (1 + 2) / 4 = 0.75; row 1: 4 / 4 = 1; mean over 2 rows = 0.875
    close(aggregate_loss(PER_TOKEN, UNEVEN_MASK, "seq-mean-token-sum-norm", max_tokens=4), 0.875)


def test_seq_mean_token_sum_norm_needs_max_tokens():
    with pytest.raises(ValueError, match="needs max_tokens"):
        aggregate_loss(PER_TOKEN, UNEVEN_MASK, "seq-mean-token-sum-norm")


def test_unknown_aggregation_lists_valid_modes():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate_loss(PER_TOKEN, UNEVEN_MASK, "sum")


def test_empty_sequence_contributes_zero_and_padding_cannot_leak():
    # third row has an all-zero mask and inf/NaN in its padding; it counts as a sequence with loss 0:
    #   seq-mean-token-mean = (1.5 + 4 + 0) / 3 = 1.8333333
    #   token-mean = 7 / 3 (the empty row adds no tokens)
    #   seq-mean-token-sum-norm (max_tokens 4) = (0.75 + 1 + 0) / 3 = 0.5833333
    per_token = torch.cat([PER_TOKEN, torch.tensor([[float("inf"), float("nan"), 1.0]])])
    mask = torch.cat([UNEVEN_MASK, torch.zeros(1, 3)])
    close(aggregate_loss(per_token, mask, "seq-mean-token-mean"), 5.5 / 3)
    close(aggregate_loss(per_token, mask, "token-mean"), 7 / 3)
    close(aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", max_tokens=4), 1.75 / 3)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert aggregate_loss(per_token[2:], mask[2:], mode, max_tokens=4).item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("split", [[2, 2], [1, 3], [1, 1, 1, 1]])
def test_micro_batch_losses_sum_to_the_mini_batch_loss(mode, split):
    # 4 rows with 3, 1, 2, 0 tokens: uneven micro-batches are where a mean of means goes wrong
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.5, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    full = aggregate_loss(per_token, mask, mode, max_tokens=5)
    # by hand: token-mean = (6 + 4 - 0.5) / 6 = 1.5833333
    #          seq-mean-token-mean = (2 + 4 - 0.25 + 0) / 4 = 1.4375
    #          seq-mean-token-sum-norm = (6/5 + 4/5 - 0.5/5 + 0) / 4 = 0.475
    close(full, {"token-mean": 9.5 / 6, "seq-mean-token-mean": 1.4375, "seq-mean-token-sum-norm": 0.475}[mode])
    parts = zip(per_token.split(split), mask.split(split))
    summed = sum(aggregate_loss(l, m, mode, max_tokens=5, num_sequences=4, num_tokens=6.0) for l, m in parts)
    close(summed, full, atol=1e-6)


# ---------------------------------------------------------------------------------------- clipped loss

def test_positive_advantage_ratio_e_is_clipped_to_1_plus_clip_high():
    # logprobs - old = 1, ratio = [e, e, e]; A = 1
    # min(e * 1, clip(e, 0.8, 1.2) * 1) = min(2.718, 1.2) = 1.2 -> per-token loss -1.2 -> loss -1.2
    # clipping wins on every token: clip_fraction 1, gradient 0
    logprobs = torch.ones(1, 3, requires_grad=True)
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3))
    close(loss, -1.2)
    close(metrics["ratio_mean"], E)
    close(metrics["clip_fraction"], 1.0)
    close(metrics["clip_fraction_high"], 1.0)
    close(metrics["clip_fraction_low"], 0.0)
    # approx_kl = k3 of KL(old || new) = (rho - 1) - log rho = e - 1 - 1 = 0.7182818
    close(metrics["approx_kl"], E - 2)
    loss.backward()
    assert logprobs.grad.abs().max().item() == 0.0


def test_negative_advantage_ratio_below_1_minus_clip_low_is_clipped():
    # logprobs - old = -1, ratio = e^-1 = 0.3679 < 0.8; A = -1
    # min(0.3679 * -1, 0.8 * -1) = min(-0.3679, -0.8) = -0.8 -> loss 0.8, gradient 0
    logprobs = torch.full((1, 2), -1.0, requires_grad=True)
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    close(loss, 0.8)
    close(metrics["clip_fraction"], 1.0)
    close(metrics["clip_fraction_low"], 1.0)
    loss.backward()
    assert logprobs.grad.abs().max().item() == 0.0


def test_negative_advantage_large_ratio_is_not_clipped():
    # ratio e, A = -1: min(-e, 1.2 * -1) = min(-2.718, -1.2) = -e -> loss e; the pessimistic bound keeps rho
    # d loss / d logprobs = -A * rho / 1 token = e
    logprobs = torch.ones(1, 1, requires_grad=True)
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    close(loss, E)
    close(metrics["clip_fraction"], 0.0)
    loss.backward()
    close(logprobs.grad, [[E]])


def test_positive_advantage_small_ratio_is_not_clipped():
    # ratio e^-1 = 0.3678794 < 0.8, A = 1: min(0.3678794, 0.8) = 0.3678794 -> loss -0.3678794, not clipped
    # (the clip only removes the incentive to move further in the advantage's direction)
    # d loss / d logprobs = -A * rho = -0.3678794
    logprobs = torch.full((1, 1), -1.0, requires_grad=True)
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    close(loss, -0.3678794)
    close(metrics["clip_fraction"], 0.0)
    close(metrics["clip_fraction_low"], 0.0)
    loss.backward()
    close(logprobs.grad, [[-0.3678794]])


def test_asymmetric_clip_range():
    # clip_low = 0.1, clip_high = 0.3: ratio clipped to [0.9, 1.3]; token-mean over 3 tokens
    # token 0: log-ratio 0.5, rho = e^0.5 = 1.6487213, A = 2:   min(3.2974425, 1.3 * 2 = 2.6) = 2.6   -> -2.6
    # token 1: log-ratio -0.5, rho = e^-0.5 = 0.6065307, A = -2: min(-1.2130613, 0.9 * -2 = -1.8) = -1.8 -> 1.8
    # token 2: log-ratio 0.25, rho = e^0.25 = 1.2840254, A = 1 (inside 1.3; symmetric 0.2 would clip at 1.2)
    #          min(1.2840254, 1.2840254) -> -1.2840254
    # loss = (-2.6 + 1.8 - 1.2840254) / 3 = -0.6946751
    logprobs = torch.tensor([[0.5], [-0.5], [0.25]])
    advantages = torch.tensor([2.0, -2.0, 1.0])
    loss, metrics = clipped_policy_loss(
        logprobs, torch.zeros(3, 1), advantages, torch.ones(3, 1), clip_low=0.1, clip_high=0.3, loss_agg="token-mean"
    )
    close(loss, (-2.6 + 1.8 - 1.2840254) / 3)
    close(metrics["clip_fraction"], 2 / 3)
    close(metrics["clip_fraction_low"], 1 / 3)
    close(metrics["clip_fraction_high"], 1 / 3)
    # the same tokens with the symmetric 0.2: token 2 is now clipped at 1.2 -> (-2.4 + 1.6 - 1.2) / 3 = -2/3
    symmetric, _ = clipped_policy_loss(logprobs, torch.zeros(3, 1), advantages, torch.ones(3, 1), loss_agg="token-mean")
    close(symmetric, -2 / 3)


def test_gradient_of_unclipped_tokens_by_hand():
    # seq-mean-token-mean, 2 rows with 2 and 1 tokens, advantages [0.5, -1], old logprobs 0
    # row 0: rho = [e^0.1, e^-0.2] = [1.1051709, 0.8187308], both inside [0.8, 1.2]
    #        d loss / d logprob = -A * rho / (tokens in row 2 * rows 2) = -0.5 * rho / 4 = [-0.1381464, -0.1023414]
    # row 1: rho = e^0.1 = 1.1051709, A = -1: min(-1.105, -1.105) unclipped
    #        d loss / d logprob = -(-1) * 1.1051709 / (1 token * 2 rows) = 0.5525855
    # masked tokens get gradient 0
    logprobs = torch.tensor([[0.1, -0.2, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = clipped_policy_loss(logprobs, torch.zeros(2, 3), torch.tensor([0.5, -1.0]), mask)
    loss.backward()
    close(logprobs.grad, [[-0.1381464, -0.1023414, 0.0], [0.5525855, 0.0, 0.0]])


def test_padding_garbage_does_not_reach_loss_or_gradient():
    # a masked slot with logprob 1000 would overflow exp to inf; it must not give inf or NaN anywhere
    logprobs = torch.tensor([[0.0, 1000.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    loss, metrics = clipped_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([1.0]), mask)
    close(loss, -1.0)  # rho = 1 on the real token, A = 1
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    close(logprobs.grad, [[-1.0, 0.0]])


def test_tis_weight_is_capped_and_detached():
    # old logprobs 0, engine logprobs [-2, 0.5]: w = min(exp(0 - (-2)), 2) = min(7.389, 2) = 2 (capped)
    #                                            w = min(exp(0 - 0.5), 2) = 0.6065307
    # logprobs = old, so rho = 1, A = 1: per-token loss = -w = [-2, -0.6065307]
    # token-mean = -2.6065307 / 2 = -1.3032653
    # d loss / d logprobs = -A * rho * w / 2 tokens = [-1, -0.3032653]; w itself gets no gradient
    logprobs = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    engine = torch.tensor([[-2.0, 0.5]], requires_grad=True)
    loss, metrics = clipped_policy_loss(
        logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), engine_logprobs=engine, tis_cap=2.0, loss_agg="token-mean"
    )
    close(loss, -1.3032653)
    close(metrics["tis_weight_mean"], (2 + 0.6065307) / 2)
    loss.backward()
    close(logprobs.grad, [[-1.0, -0.3032653]])
    assert engine.grad is None  # detached: no path from the loss to the engine logprobs
    # old gets gradient only through rho = exp(logprobs - old), i.e. the opposite of logprobs' gradient
    close(old.grad, [[1.0, 0.3032653]])


def test_tis_is_off_without_cap_or_engine_logprobs():
    engine = torch.tensor([[-2.0, 0.5]])
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    for kwargs in ({"engine_logprobs": engine}, {"tis_cap": 2.0}):
        loss, metrics = clipped_policy_loss(*args, loss_agg="token-mean", **kwargs)
        close(loss, -1.0)
        assert "tis_weight_mean" not in metrics


def test_clipped_loss_metrics_sum_over_micro_batches():
    # the metrics use num_tokens like the loss, so summed micro-batch metrics equal the mini-batch ones
    torch.manual_seed(0)
    logprobs, old = torch.randn(4, 5) * 0.3, torch.randn(4, 5) * 0.3
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0, 0, 0], [1.0, 0, 0, 0, 0], [1.0] * 4 + [0.0]])
    engine = old + 0.1 * torch.randn(4, 5)
    kwargs = dict(engine_logprobs=engine, tis_cap=1.05, loss_agg="token-mean")
    full_loss, full_metrics = clipped_policy_loss(logprobs, old, advantages, mask, **kwargs)
    sums = {}
    total_loss = 0.0
    for index in (slice(0, 1), slice(1, 4)):
        loss, metrics = clipped_policy_loss(
            logprobs[index], old[index], advantages[index], mask[index],
            num_sequences=4, num_tokens=mask.sum().item(), engine_logprobs=engine[index], tis_cap=1.05,
            loss_agg="token-mean",
        )
        total_loss = total_loss + loss
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    close(total_loss, full_loss, atol=1e-6)
    for name, value in full_metrics.items():
        close(sums[name], value, atol=1e-6)


def test_clipped_loss_shape_validation():
    with pytest.raises(ValueError, match=r"must be \[B\]"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------- objectives

def test_registry_and_protocol():
    assert set(OBJECTIVES) == {"grpo", "dr-grpo", "rloo", "ppo"}
    for name, cls in OBJECTIVES.items():
        objective = cls()
        assert objective.name == name
        assert isinstance(objective, PolicyObjective)
        assert not objective.needs_reference
    assert GRPO(kl_coef=0.01).needs_reference


def test_defaults():
    assert (GRPO().scale_by_std, GRPO().loss_agg) == (True, "seq-mean-token-mean")
    assert (DrGRPO().scale_by_std, DrGRPO().loss_agg) == (False, "seq-mean-token-sum-norm")
    assert RLOO().loss_agg == "token-mean"
    assert GRPO().tis_cap == 2.0 and GRPO().kl_estimator == "k3"


def _scored(rewards, group_index):
    """A batch as the loop hands it to an objective's `advantages`: rewards [B] and each row's group [B]."""
    rewards = torch.tensor(rewards)
    return TrainBatch(input_ids=torch.zeros(len(rewards), 2, dtype=torch.long),
                      attention_mask=torch.ones(len(rewards), 2, dtype=torch.long),
                      response_mask=torch.ones(len(rewards), 2), advantages=torch.zeros(len(rewards)),
                      engine_logprobs=torch.zeros(len(rewards), 2), rewards=rewards,
                      group_index=torch.tensor(group_index))


def test_objective_advantages():
    batch = _scored([1.0, 2.0, 6.0], [0, 0, 0])
    close(GRPO().advantages(batch).values, [-0.9258196, -0.4629098, 1.3887294])  # centred / sqrt(14/3)
    close(DrGRPO().advantages(batch).values, [-2.0, -1.0, 3.0])  # centred only
    close(RLOO().advantages(batch).values, [-3.0, -1.5, 4.5])  # leave-one-out
    assert GRPO().advantages(batch).metrics["advantage/abs_mean"] == pytest.approx(2.7774588 / 3)


def test_objectives_see_the_whole_batch_with_ragged_interleaved_groups():
    # Group 7: rewards [1, 2, 6] (rows 0, 2, 4); group 3: [0, 1] (rows 1, 3); group 9: [5] alone (row 5).
    batch = _scored([1.0, 0.0, 2.0, 1.0, 6.0, 5.0], [7, 3, 7, 3, 7, 9])
    # group 3: centred [-0.5, 0.5], population std 0.5 -> [-1, 1] (up to the 1e-6 epsilon); a lone sample: 0
    close(GRPO().advantages(batch).values, [-0.9258196, -0.999998, -0.4629098, 0.999998, 1.3887294, 0.0])
    close(DrGRPO().advantages(batch).values, [-2.0, -0.5, -1.0, 0.5, 3.0, 0.0])
    # the same groups laid out consecutively give the same numbers as group_size
    close(group_advantages(torch.tensor([1.0, 2.0, 6.0]), group_size=3, scale_by_std=False), [-2.0, -1.0, 3.0])
    with pytest.raises(ValueError, match="RLOO needs >= 2 samples"):
        RLOO().advantages(batch)  # group 9 has one sample
    close(RLOO().advantages(_scored([1.0, 0.0, 2.0, 1.0], [7, 3, 7, 3])).values, [-1.0, -1.0, 1.0, 1.0])


def test_objectives_declare_what_they_need():
    assert RLOO.__mro__[1] is GRPO  # RLOO is GRPO with a leave-one-out baseline, not a copy
    for cls, group, critic in [(GRPO, True, False), (DrGRPO, True, False), (RLOO, True, False), (PPO, False, True)]:
        assert (cls.uses_group_baseline, cls.needs_critic) == (group, critic)
        assert isinstance(cls(), PolicyObjective)


def test_grpo_vs_dr_grpo_on_unequal_lengths():
    # row 0: 1 token, A = +1; row 1: 3 tokens, A = -1; rho = 1 (no old logprobs), TIS off, max_tokens 4
    # per-token loss = -A: row 0 [-1], row 1 [1, 1, 1]
    # GRPO (seq-mean-token-mean): (-1/1 + 3/3) / 2 = 0        -- each sequence weighs the same
    #   grads: row 0 -A / (1 * 2) = -0.5; row 1 -A / (3 * 2) = 0.1666667
    # Dr. GRPO (seq-mean-token-sum-norm): (-1/4 + 3/4) / 2 = 0.25  -- each token weighs the same
    #   grads: row 0 -1 / (4 * 2) = -0.125; row 1 1 / (4 * 2) = 0.125
    # RLOO (token-mean): (-1 + 3) / 4 tokens = 0.5
    mask = [[1, 0, 0, 0], [1, 1, 1, 0]]
    batch = make_batch([1.0, -1.0], mask)
    expected = [
        (GRPO(tis_cap=None), 0.0, [[-0.5, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]]),
        (DrGRPO(tis_cap=None), 0.25, [[-0.125, 0, 0, 0], [0.125, 0.125, 0.125, 0]]),
        (RLOO(tis_cap=None), 0.5, [[-0.25, 0, 0, 0], [0.25, 0.25, 0.25, 0]]),
    ]
    for objective, expected_loss, expected_grad in expected:
        logprobs = torch.full((2, 4), -1.0, requires_grad=True)
        loss, metrics = objective.loss(logprobs, batch, num_sequences=2, num_tokens=4.0, max_tokens=4)
        close(loss, expected_loss)
        close(metrics["policy_loss"], expected_loss)
        assert "kl" not in metrics
        loss.backward()
        close(logprobs.grad, expected_grad)


def test_kl_term_is_added_with_its_coefficient():
    # logprobs = log 0.5 everywhere, ref = log 0.25: k3 = 0.1931472 on every token, so any mean is 0.1931472
    # policy part: rho = 1 (old = None), TIS off, A = [1, 0.5], seq-mean-token-mean: -(1 + 0.5) / 2 = -0.75
    # loss = -0.75 + 0.1 * 0.1931472 = -0.7306853
    # gradient of a row-0 token (2 tokens, 2 rows): policy -A / 4 = -0.25;
    #   KL: 0.1 * d k3 / d logp / 4 = 0.1 * (1 - exp(ref - logp)) / 4 = 0.1 * (1 - 0.5) / 4 = 0.0125 -> -0.2375
    batch = make_batch([1.0, 0.5], [[1, 1], [1, 0]], ref_logprobs=torch.full((2, 2), math.log(0.25)))
    objective = GRPO(kl_coef=0.1, tis_cap=None)
    logprobs = torch.full((2, 2), math.log(0.5), requires_grad=True)
    loss, metrics = objective.loss(logprobs, batch, num_sequences=2, num_tokens=3.0, max_tokens=2)
    close(loss, -0.7306853)
    close(metrics["kl"], 0.1931472)
    close(metrics["policy_loss"], -0.75)
    assert metrics["kl"].dim() == 0 and not metrics["kl"].requires_grad  # detached, left on the device
    loss.backward()
    close(logprobs.grad[0], [-0.2375, -0.2375])
    # row 1 (1 token, A = 0.5): -0.5 / 2 + 0.1 * 0.5 / 2 = -0.225
    close(logprobs.grad[1], [-0.225, 0.0])


def test_kl_is_reported_but_not_added_when_coef_is_zero():
    batch = make_batch([1.0], [[1, 1]], ref_logprobs=torch.full((1, 2), math.log(0.25)))
    logprobs = torch.full((1, 2), math.log(0.5), requires_grad=True)
    loss, metrics = GRPO(tis_cap=None).loss(logprobs, batch, num_sequences=1, num_tokens=2.0, max_tokens=2)
    close(loss, -1.0)
    close(metrics["kl"], 0.1931472)


def test_kl_coef_without_ref_logprobs_is_a_clear_error():
    batch = make_batch([1.0], [[1, 1]])
    with pytest.raises(ValueError, match="needs batch.ref_logprobs"):
        GRPO(kl_coef=0.1).loss(torch.zeros(1, 2), batch, num_sequences=1, num_tokens=2.0, max_tokens=2)


def test_objective_tis_with_no_old_logprobs_uses_detached_weight():
    # old = logprobs.detach() = 0; engine = [-2, 0.5] -> w = [min(e^2, 2), e^-0.5] = [2, 0.6065307]
    # RLOO token-mean, A = 1: loss = -(2 + 0.6065307) / 2 = -1.3032653
    # grad = -A * rho * w / 2 = [-1, -0.3032653] (old must be a detached copy: rho = exp(logprobs - logprobs)
    # would have no gradient at all, and a w built from it would add a second term)
    batch = make_batch([1.0], [[1, 1]], engine_logprobs=torch.tensor([[-2.0, 0.5]]))
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, metrics = RLOO().loss(logprobs, batch, num_sequences=1, num_tokens=2.0, max_tokens=2)
    close(loss, -1.3032653)
    close(metrics["tis_weight_mean"], 1.3032653)
    loss.backward()
    close(logprobs.grad, [[-1.0, -0.3032653]])


def test_objective_uses_old_logprobs_for_the_ratio():
    # old = 0, logprobs = 1: rho = e, A = 1 -> clipped at 1 + 0.28 = 1.28 (DAPO clip-higher) -> loss -1.28
    batch = make_batch([1.0], [[1]], old_logprobs=torch.zeros(1, 1))
    loss, metrics = GRPO(clip_high=0.28, tis_cap=None).loss(
        torch.ones(1, 1), batch, num_sequences=1, num_tokens=1.0, max_tokens=1
    )
    close(loss, -1.28)
    close(metrics["clip_fraction"], 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_low": -0.1}, "clip_low=-0.1 must be >= 0"),
        ({"clip_high": -1.0}, "clip_high=-1.0 must be >= 0"),
        ({"tis_cap": 0.0}, "tis_cap=0.0 must be > 0"),
        ({"kl_coef": -0.5}, "kl_coef=-0.5 must be >= 0"),
        ({"kl_estimator": "k4"}, "must be one of k1, k2, k3"),
        ({"loss_agg": "sum"}, "must be one of token-mean"),
    ],
)
@pytest.mark.parametrize("cls", [GRPO, DrGRPO, RLOO])
def test_objective_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ValueError, match="clip_low=-1.*kl_coef=-1"):
        GRPO(clip_low=-1, kl_coef=-1)
