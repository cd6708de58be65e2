"""PPO with a critic: GAE, whitening and the clipped value loss against hand-worked numbers (in the
comments), the critic's value model and learner, the objective's wiring, and a run that must learn."""
import math

import pytest
import torch

from winnow.algorithms import (
    OBJECTIVES,
    PPO,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    token_rewards,
    whiten,
)
from winnow.learner.critic import ValueModel, make_critic, token_values
from winnow.learner.learner import LearnerConfig
from winnow.types import TrainBatch


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


T = torch.tensor


# ---------------------------------------------------------------------------------------- GAE

def test_gae_gamma_1_lambda_095_by_hand():
    # One response of 3 tokens, reward 1 on the last, V = [0.5, 0.6, 0.7], gamma 1, lambda 0.95:
    #   t=2: delta = 1 + 1*0 (no bootstrap past the end) - 0.7 = 0.3;  A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1;                             A1 = 0.1 + 0.95*0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1;                             A0 = 0.1 + 0.95*0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    adv, ret = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), 1.0, 0.95)
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_gamma_09_lambda_095_by_hand():
    # gamma 0.9, so gamma*lambda = 0.855:
    #   t=2: delta = 1 - 0.7 = 0.3;               A2 = 0.3
    #   t=1: delta = 0.9*0.7 - 0.6 = 0.03;        A1 = 0.03 + 0.855*0.3    = 0.2865
    #   t=0: delta = 0.9*0.6 - 0.5 = 0.04;        A0 = 0.04 + 0.855*0.2865 = 0.2849575
    #   returns = [0.7849575, 0.8865, 1.0]
    adv, ret = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), 0.9, 0.95)
    close(adv, [[0.2849575, 0.2865, 0.3]])
    close(ret, [[0.7849575, 0.8865, 1.0]])


def test_gae_lambda_1_is_monte_carlo_minus_the_value():
    # gamma = lambda = 1: A_t = (sum of rewards from t on) - V_t = 1 - V
    adv, ret = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), 1.0, 1.0)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_ignores_prompt_and_right_padding():
    # Row 0: a prompt token, 2 response tokens, 2 padding; the values off the mask are garbage (9) and must
    #   not be bootstrapped from. gamma 1, lambda 0.95, reward 1 on the last response token (t=2):
    #   t=2: delta = 1 - 0.6 = 0.4;  A = 0.4;     t=1: delta = 0.6 - 0.5 = 0.1;  A = 0.1 + 0.95*0.4 = 0.48
    # Row 1: the same response, but its last token is the last column: same numbers one column later.
    rewards = T([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    values = T([[9.0, 0.5, 0.6, 9.0, 9.0], [9.0, 9.0, 9.0, 0.5, 0.6]])
    mask = T([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 0.95)
    close(adv, [[0.0, 0.48, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.48, 0.4]])
    close(ret, [[0.0, 0.98, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.98, 1.0]])


def test_gae_skips_a_hole_in_the_mask():
    # mask [1, 0, 1]: the middle token (e.g. a tool's output) is not an action; GAE steps from t=0 to t=2.
    #   t=2: A = 1 - 0.7 = 0.3;   t=0: delta = 0.7 - 0.5 = 0.2, A = 0.2 + 0.95*0.3 = 0.485
    adv, ret = gae_advantages(T([[0.0, 0.0, 1.0]]), T([[0.5, 9.0, 0.7]]), T([[1.0, 0.0, 1.0]]), 1.0, 0.95)
    close(adv, [[0.485, 0.0, 0.3]])
    close(ret, [[0.985, 0.0, 1.0]])


def test_token_rewards_put_the_reward_on_the_last_token_minus_the_kl_penalty():
    # kl_coef 0.5, per-token k1 on the mask:
    #   row 0, response at t=1,2, R=1:   [0, -0.5*0.1, 1 - 0.5*0.2, 0] = [0, -0.05, 0.9, 0]
    #   row 1, response at t=1..3, R=0.5: [0, +0.05, -0.15, 0.5 - 0.2] = [0, 0.05, -0.15, 0.3]
    #   row 2, empty mask: no action, no reward
    mask = T([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    kl = T([[7.0, 0.1, 0.2, 7.0], [7.0, -0.1, 0.3, 0.4], [7.0, 7.0, 7.0, 7.0]])
    got = token_rewards(T([1.0, 0.5, 2.0]), mask, kl, kl_coef=0.5)
    close(got, [[0.0, -0.05, 0.9, 0.0], [0.0, 0.05, -0.15, 0.3], [0.0, 0.0, 0.0, 0.0]])
    close(token_rewards(T([1.0, 0.5, 2.0]), mask), [[0, 0, 1, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------- whitening

def test_whiten_over_the_masked_tokens_of_the_batch():
    # masked entries 1, 2, 3 (across two rows; 99 is padding): mean 2, population var (1 + 0 + 1)/3 = 2/3,
    #   std 0.8164966 -> [-1.2247449, 0, 1.2247449]; shift_mean=False adds the mean 2 back
    x, mask = T([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]]), T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(whiten(x, mask), [[-1.2247449, 0.0, 0.0], [1.2247449, 0.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[0.7752551, 2.0, 0.0], [3.2247449, 0.0, 0.0]])
    # a constant input: var 0, eps keeps it finite: (x - mean) = 0 -> 0
    assert whiten(T([[5.0, 5.0]]), T([[1.0, 1.0]])).tolist() == [[0.0, 0.0]]


# ---------------------------------------------------------------------------------------- value loss

def test_clipped_value_loss_by_hand():
    # clip 0.2; the 4th column is padding.
    #   t0: V=1.0, old 0.5 -> V_clip = 0.5 + 0.2 = 0.7; (1-2)^2 = 1 < (0.7-2)^2 = 1.69: clipped wins, 0.845
    #   t1: V=0.5, old 0.5 -> V_clip = 0.5;            (0.5-0)^2 = 0.25 both: not clipped,        0.125
    #   t2: V=0.0, old 0.5 -> V_clip = 0.3;            (0-1)^2 = 1 > (0.3-1)^2 = 0.49: unclipped, 0.5
    #   loss = (0.845 + 0.125 + 0.5) / 3 = 0.49; clip fraction 1/3; mean V 0.5; mean |V-R| = 2.5/3
    #   gradient / token: t0 0 (V_clip is flat past the clip), t1 (V-R)/3 = 0.5/3, t2 (0-1)/3
    values = T([[1.0, 0.5, 0.0, 7.0]], requires_grad=True)
    old, returns, mask = T([[0.5, 0.5, 0.5, 0.0]]), T([[2.0, 0.0, 1.0, 0.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.49)
    close(metrics["value_clip_fraction"], 1 / 3)
    close(metrics["value_mean"], 0.5)
    close(metrics["value_error"], 2.5 / 3)
    loss.backward()
    close(values.grad, [[0.0, 0.5 / 3, -1 / 3, 0.0]])
    # No clip: 0.5 * (1 + 0.25 + 1) / 3 = 0.375
    close(clipped_value_loss(values, old, returns, mask, clip=None)[0], 0.375)
    # Micro-batches with the mini-batch's token count sum to the whole loss: columns split 2 + 1 tokens
    parts = [clipped_value_loss(values[:, s], old[:, s], returns[:, s], mask[:, s], 0.2, num_tokens=3.0)[0]
             for s in (slice(0, 2), slice(2, 4))]
    close(sum(parts), 0.49)


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0, 50.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    close(explained_variance(returns, returns, mask), 1.0)          # perfect
    close(explained_variance(returns - 5, returns, mask), 1.0)      # a constant offset is no variance
    close(explained_variance(T([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)  # a constant: explains nothing
    # V = [3, 2, 1]: residual [-2, 0, 2], var 8/3; var R = 2/3 -> 1 - 4 = -3
    close(explained_variance(T([[3.0, 2.0, 1.0, 0.0]]), returns, mask), -3.0)


def test_clipped_policy_loss_takes_per_token_advantages():
    # rho = [1, 1.5], A = [1, -2]:  t0: -min(1, 1) = -1;  t1: -min(1.5*-2 = -3, 1.2*-2 = -2.4) = 3
    #   token-mean = (-1 + 3) / 2 = 1.0
    logprobs = T([[0.0, math.log(1.5)]])
    loss, _ = clipped_policy_loss(logprobs, T([[0.0, 0.0]]), T([[1.0, -2.0]]), T([[1.0, 1.0]]),
                                  loss_agg="token-mean")
    close(loss, 1.0)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        clipped_policy_loss(logprobs, logprobs, T([[1.0, 2.0, 3.0]]), T([[1.0, 1.0]]))


# ---------------------------------------------------------------------------------------- objective

def ppo_batch(**fields):
    mask = T([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    return TrainBatch(input_ids=torch.zeros(mask.shape, dtype=torch.long), attention_mask=torch.ones(2, 4),
                      response_mask=mask, advantages=torch.zeros(2), engine_logprobs=torch.zeros(2, 4), **fields)


def test_ppo_token_advantages_are_gae_whitened():
    # Row 0: V = [0.5, 0.6, 0.7] on its 3 response tokens, R = 1 -> A = [0.46575, 0.385, 0.3] (test above)
    # Row 1: V = [0.2, 0.4], R = 0: t=2: A = 0 - 0.4 = -0.4; t=1: delta = 0.4 - 0.2 = 0.2, A = 0.2 - 0.38 = -0.18
    batch = ppo_batch(rewards=T([1.0, 0.0]), old_values=T([[0.0, 0.5, 0.6, 0.7], [0.0, 0.2, 0.4, 0.0]]))
    raw, ret, metrics = PPO(whiten_advantages=False).token_advantages(batch)
    close(raw, [[0.0, 0.46575, 0.385, 0.3], [0.0, -0.18, -0.4, 0.0]])
    close(ret, [[0.0, 0.96575, 0.985, 1.0], [0.0, 0.02, 0.0, 0.0]])
    close(metrics["advantage/mean"], (0.46575 + 0.385 + 0.3 - 0.18 - 0.4) / 5)
    adv, _, _ = PPO().token_advantages(batch)
    close(adv, whiten(raw, batch.response_mask))
    close(adv[batch.response_mask.bool()].mean(), 0.0)


def test_ppo_kl_penalty_goes_into_the_reward_and_needs_the_reference():
    # kl_coef 0.1, k1 = old - ref = 1 on every token: each reward drops by 0.1. gamma = lambda = 1, V = 0:
    #   row 0 (R=1, 3 tokens): A = [1 - 0.3, 1 - 0.2, 1 - 0.1] = [0.7, 0.8, 0.9]; row 1 (R=0): [-0.2, -0.1]
    ppo = PPO(kl_coef=0.1, gamma=1.0, lam=1.0, whiten_advantages=False)
    assert ppo.needs_reference and not PPO().needs_reference
    batch = ppo_batch(rewards=T([1.0, 0.0]), old_values=torch.zeros(2, 4), old_logprobs=torch.zeros(2, 4),
                      ref_logprobs=-torch.ones(2, 4))
    adv, _, metrics = ppo.token_advantages(batch)
    close(adv, [[0.0, 0.7, 0.8, 0.9], [0.0, -0.2, -0.1, 0.0]])
    close(metrics["rollout/kl_k1"], 1.0)
    batch.ref_logprobs = None
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo.token_advantages(batch)


def test_ppo_is_registered_and_validates():
    assert OBJECTIVES["ppo"] is PPO and PPO.needs_critic
    # the objective's advantages of a valued batch are its per-token GAE advantages and returns
    batch = ppo_batch(rewards=T([1.0, 0.0]), old_values=T([[0.0, 0.5, 0.6, 0.7], [0.0, 0.2, 0.4, 0.0]]))
    result, (adv, ret, _) = PPO().advantages(batch), PPO().token_advantages(batch)
    assert torch.equal(result.values, adv) and torch.equal(result.returns, ret) and result.values.shape == (2, 4)
    with pytest.raises(ValueError, match="lam=1.5"):
        PPO(lam=1.5)
    with pytest.raises(ValueError, match="value_clip"):
        PPO(value_clip=0.0)


def test_ppo_flags_parse():
    from winnow.config import parse
    from winnow.recipes.rl import TrainConfig

    config = parse(TrainConfig[PPO], TrainConfig(algo=PPO()),
                   ["--algo.lam", "0.9", "--algo.critic-lr", "1e-4", "--algo.value-clip", "None",
                    "--rollout.num-samples", "1"], prog="t")
    assert config.algo == PPO(lam=0.9, critic_lr=1e-4, value_clip=None) and config.rollout.num_samples == 1


# ---------------------------------------------------------------------------------------- critic

def test_value_model_reads_the_hidden_state_before_each_token(tiny_model):
    critic = ValueModel.from_policy(tiny_model, head_init_std=0.1)
    # The backbone is a copy: same weights, not shared storage.
    assert torch.equal(critic.backbone.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    assert critic.backbone.embed_tokens.weight.data_ptr() != tiny_model.model.embed_tokens.weight.data_ptr()
    input_ids = T([[3, 4, 5, 6, 0]])
    batch = TrainBatch(input_ids=input_ids, attention_mask=T([[1, 1, 1, 1, 0]]),
                       response_mask=T([[0.0, 0.0, 1.0, 1.0, 0.0]]), advantages=torch.zeros(1),
                       engine_logprobs=torch.zeros(1, 5))
    with torch.no_grad():
        values = token_values(critic, batch)
        hidden = tiny_model.model(input_ids=input_ids[:, :4]).last_hidden_state  # [1, 4, H]
        expected = critic.head(hidden).squeeze(-1)  # V after reading tokens 0..3
    # token 2 is chosen after reading tokens 0..1: V from position 1; token 3 from position 2; 0 elsewhere
    close(values, [[0.0, 0.0, expected[0, 1], expected[0, 2], 0.0]])


def test_critic_starts_at_zero_and_fits_its_returns(tiny_model):
    critic = make_critic(tiny_model, LearnerConfig(lr=1e-6), lr=3e-3, total_steps=30, device="cpu")
    assert critic.config.lr == 3e-3
    mask = T([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    batch = TrainBatch(input_ids=T([[3, 4, 5, 6], [3, 7, 8, 9]]), attention_mask=torch.ones(2, 4, dtype=torch.long),
                       response_mask=mask, advantages=torch.zeros(2, 4), engine_logprobs=torch.zeros(2, 4),
                       old_values=torch.zeros(2, 4), returns=T([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]]))
    assert critic.predict(batch).abs().max() == 0  # zero-initialised head
    ppo = PPO(value_clip=None)
    losses = [critic.train_step(batch, ppo.value_loss)["value_loss"] for _ in range(30)]
    assert losses[0] == pytest.approx(0.5) and losses[-1] < 0.05, losses  # 0.5 * mean(R^2) = 0.5 at first
    close(critic.predict(batch), batch.returns, atol=0.3)


def test_critic_builds_with_compiled_layers(tiny_model):
    # --learner.compile reaches the critic's decoder layers through ValueModel.get_decoder (compiled lazily)
    critic = make_critic(tiny_model, LearnerConfig(compile=True), lr=1e-5, total_steps=1, device="cpu")
    assert critic.model.get_decoder() is critic.model.backbone


def test_critic_refuses_sharded_strategies_with_the_fix(tiny_model):
    with pytest.raises(ValueError, match="--learner.strategy single"):
        make_critic(tiny_model, LearnerConfig(strategy="fsdp2"), lr=1e-5, total_steps=1)
