"""The learner: logprobs by hand, micro-batching that doesn't change the maths, schedules, SFT that learns."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from winnow.algorithms import GRPO
from winnow.learner.batch import make_sft_batch, make_train_batch
from winnow.learner.learner import Learner, LearnerConfig, _schedule, _split_largest, _token_budget_sizes
from winnow.learner.logprobs import can_fuse_head, linear_logprobs, selective_logprobs, sequence_logprobs
from winnow.algorithms.sft import sft_loss
from winnow.types import Completion


def test_selective_logprobs_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 7), torch.randint(0, 7, (10,))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(selective_logprobs(logits, labels, chunk_rows=3), expected)
    torch.testing.assert_close(selective_logprobs(logits.bfloat16(), labels), expected, atol=0.05, rtol=0)


def test_train_batch_by_hand():
    # Rows [prompt | response]: [5 6 | 7 8 9], [4 | ], [1 2 3 | 10]: right-padded with 0 to the longest (5).
    completions = [Completion([5, 6], [7, 8, 9], [-0.5, -1.5, -2.5], "stop", ""),
                   Completion([4], [], [], "stop", ""),
                   Completion([1, 2, 3], [10], [-3.0], "length", "")]
    batch = make_train_batch(completions, torch.tensor([1.0, 0.0, -1.0]), torch.tensor([2.0, 0.0, 1.0]), 0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0], [1, 2, 3, 10, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert batch.engine_logprobs.tolist() == [[0, 0, -0.5, -1.5, -2.5], [0] * 5, [0, 0, 0, -3.0, 0]]
    assert batch.advantages.tolist() == [1.0, 0.0, -1.0] and batch.rewards.tolist() == [2.0, 0.0, 1.0]
    assert (batch.input_ids.dtype, batch.attention_mask.dtype, batch.response_mask.dtype) == (
        torch.long, torch.long, torch.float32)
    with pytest.raises(ValueError, match="different number of logprobs than response tokens"):
        make_train_batch([Completion([1], [2, 3], [-1.0], "stop", "")])


def _train_batch_row_by_row(completions: list[Completion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """make_train_batch's tensors filled one row at a time."""
    shape = (len(completions), max(len(c.prompt_ids) + len(c.response_ids) for c in completions))
    out = {"input_ids": torch.full(shape, pad_token_id), "attention_mask": torch.zeros(shape, dtype=torch.long),
           "response_mask": torch.zeros(shape), "engine_logprobs": torch.zeros(shape)}
    for row, c in enumerate(completions):
        start, end = len(c.prompt_ids), len(c.prompt_ids) + len(c.response_ids)
        out["input_ids"][row, :end] = torch.tensor(c.prompt_ids + c.response_ids, dtype=torch.long)
        out["attention_mask"][row, :end] = 1
        out["response_mask"][row, start:end] = 1
        out["engine_logprobs"][row, start:end] = torch.tensor(c.logprobs, dtype=torch.float32)
    return out


def test_train_batch_equals_the_row_by_row_build():
    """Prompts and responses of mixed lengths (an empty response among them), a pad id that is not 0, logprobs that
    round in float32, ids past 2**31: every tensor as a row-by-row build makes it, in the same dtype."""
    g = torch.Generator().manual_seed(0)
    completions = []
    for prompt_len, response_len in [(3, 5), (1, 0), (7, 2), (2, 9), (5, 5)]:
        response_ids = torch.randint(2**31, 2**33, (response_len,), generator=g).tolist()
        logprobs = (-10 * torch.rand(response_len, generator=g, dtype=torch.float64)).tolist()
        completions.append(Completion(torch.randint(0, 100, (prompt_len,), generator=g).tolist(), response_ids,
                                      logprobs, "stop", ""))
    batch = make_train_batch(completions, pad_token_id=7)
    for name, expected in _train_batch_row_by_row(completions, pad_token_id=7).items():
        actual = getattr(batch, name)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), name


def test_sequence_logprobs_by_hand(tiny_model):
    # Two rows, prompt lengths 2 and 1, responses of 2 and 3 tokens (right-padded to 4).
    completions = [
        Completion([3, 4], [5, 6], [0.0, 0.0], "stop", ""),
        Completion([7], [8, 9, 10], [0.0] * 3, "stop", ""),
    ]
    batch = make_train_batch(completions, torch.zeros(2), pad_token_id=0)
    assert batch.input_ids.tolist() == [[3, 4, 5, 6], [7, 8, 9, 10]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    with torch.no_grad():
        got = sequence_logprobs(tiny_model, batch, temperature=0.5)
        for row in range(2):
            logp = torch.log_softmax(tiny_model(batch.input_ids[row : row + 1]).logits[0] / 0.5, -1)
            for t in range(4):
                want = float(logp[t - 1, batch.input_ids[row, t]]) if batch.response_mask[row, t] else 0.0
                assert float(got[row, t]) == pytest.approx(want, abs=1e-5)


def _rl_batch(tokenizer, num=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    completions = []
    for i in range(num):
        prompt = torch.randint(3, 15, (2 + i % 3,), generator=g).tolist()
        response = torch.randint(3, 15, (1 + i % 4,), generator=g).tolist()
        completions.append(Completion(prompt, response, [-2.0] * len(response), "stop", ""))
    advantages = torch.randn(num, generator=g)
    return make_train_batch(completions, advantages, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("objective", [GRPO(), GRPO(loss_agg="token-mean"), GRPO(loss_agg="seq-mean-token-sum-norm")])
def test_micro_batch_size_does_not_change_the_update(tiny_model, tiny_tokenizer, objective):
    """Gradient accumulation is memory only: micro-batch 3 and 8 give the same step."""
    batch = _rl_batch(tiny_tokenizer)
    loss_fn = partial(objective.loss, max_tokens=8)
    results = []
    for micro in (3, 8):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, LearnerConfig(lr=1e-3, micro_batch_size=micro), total_steps=1, device="cpu")
        metrics = learner.train_step(batch, loss_fn)
        # Compare gradients, not Adam's first step (lr x sign(g) magnifies float noise on tiny gradients).
        results.append((metrics, [p.grad.clone() for p in model.parameters()]))
    (m1, p1), (m2, p2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_step_metrics_sum_over_micro_batches_as_floats(tiny_model, tiny_tokenizer):
    """A loss function's metrics may be host floats or device tensors; the step sums both over micro-batches
    (8 rows in micro-batches of 3: 3 + 3 + 2 rows) and returns floats."""
    batch = _rl_batch(tiny_tokenizer)

    def loss_fn(logprobs, micro, *, num_sequences, num_tokens):
        rows = micro.batch_size
        return (logprobs * micro.response_mask).sum() * 0.0, {"rows_float": float(rows),
                                                                "rows_tensor": torch.tensor(rows / num_sequences)}

    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(micro_batch_size=3), total_steps=1, device="cpu")
    metrics = learner.train_step(batch, loss_fn)
    assert metrics["rows_float"] == 8.0 and isinstance(metrics["rows_float"], float)
    assert metrics["rows_tensor"] == pytest.approx(1.0) and isinstance(metrics["rows_tensor"], float)
    assert metrics["loss"] == 0.0


def test_token_budget_micro_batch_sizes_by_hand():
    # longest first: 20 // 10 = 2 units ([10, 8]), then 20 // 5 = 4 ([5, 5, 2, 1])
    assert _token_budget_sizes([10, 8, 5, 5, 2, 1], 1, 20) == [2, 4]
    # pairs (2 rows a unit): 20 // (10 * 2) = 1, then 20 // (5 * 2) = 2
    assert _token_budget_sizes([10, 5, 2], 2, 20) == [1, 2]
    assert _token_budget_sizes([30, 1], 1, 20) == [1, 1]  # longer than the budget: alone
    assert _split_largest([2, 4], 4) == [1, 1, 2, 2]  # halve the largest (the first of equals) until 4
    assert _split_largest([3], 1) == [3]


def test_token_budget_micro_batches_give_the_same_update_within_the_budget(tiny_model, tiny_tokenizer):
    """micro_batch_tokens changes how rows are grouped, never the step: gradients and logprobs as with
    micro-batches of 8 rows, and every micro-batch of more than one row fits the budget."""
    batch = _rl_batch(tiny_tokenizer)
    loss_fn = partial(GRPO().loss, max_tokens=8)
    results = []
    for fields in (dict(micro_batch_size=8), dict(micro_batch_tokens=12)):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, LearnerConfig(lr=1e-3, **fields), total_steps=1, device="cpu")
        micro_batches = list(learner._micro_batches(batch))
        logprobs = learner.logprobs(model, batch)
        metrics = learner.train_step(batch, loss_fn)
        results.append((micro_batches, logprobs, metrics, [p.grad.clone() for p in model.parameters()]))
    (whole, lp1, m1, g1), (budgeted, lp2, m2, g2) = results
    assert len(whole) == 1 and len(budgeted) > 2
    assert sum(mb.batch_size for mb in budgeted) == 8  # every row once, every response token once
    assert sum(int(mb.response_mask.sum()) for mb in budgeted) == int(batch.response_mask.sum())
    assert all(mb.batch_size == 1 or mb.batch_size * mb.input_ids.shape[1] <= 12 for mb in budgeted)
    torch.testing.assert_close(lp1, lp2, atol=1e-6, rtol=1e-5)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_learning_rate_schedules():
    def lrs(kind, warmup, total, min_ratio=0.0):
        factor = _schedule(kind, warmup, total, min_ratio)
        return [factor(s) for s in range(total)]

    # Warm-up of 4 steps: 1/4, 2/4, 3/4, 1, then constant.
    assert lrs("constant", 4, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # Linear from 1 at step 0 to 0.1 at the last step (progress = step / total).
    assert lrs("linear", 0, 5, 0.1) == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28])
    # Cosine: halfway through it is (1 + min_ratio) / 2.
    assert lrs("cosine", 0, 4)[2] == pytest.approx(0.5)


def test_learner_config_rejects_bad_values():
    # messages name the flag that fixes them, not the internal field
    with pytest.raises(ValueError, match="--learner.lr-schedule 'exponential'"):
        LearnerConfig(lr_schedule="exponential")
    with pytest.raises(ValueError, match="--learner.micro-batch-size 0 must be >= 1"):
        LearnerConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="--learner.max-bad-steps 0 must be >= 1"):
        LearnerConfig(max_bad_steps=0)
    with pytest.raises(ValueError, match="--learner.lr -1.0 must be > 0"):
        LearnerConfig(lr=-1.0)


def test_several_optimizer_steps_per_iteration_use_old_logprobs(tiny_model, tiny_tokenizer):
    batch = _rl_batch(tiny_tokenizer, num=8)
    config = LearnerConfig(lr=1e-3, num_mini_batches=2, num_epochs=2, micro_batch_size=4)
    learner = Learner(tiny_model, config, total_steps=4, device="cpu")
    metrics = learner.train_policy(batch, partial(GRPO().loss, max_tokens=8))
    assert learner.num_steps == 4
    # The first step sees rho = 1 exactly; later ones see the updated policy, so the mean drifts from 1.
    assert metrics["ratio_mean"] != pytest.approx(1.0, abs=1e-7)


def test_reference_model_kl_starts_at_zero(tiny_model, tiny_tokenizer):
    batch = _rl_batch(tiny_tokenizer)
    objective = GRPO(kl_coef=0.1)
    learner = Learner(tiny_model, LearnerConfig(lr=1e-3), 2, ref_model=copy.deepcopy(tiny_model), device="cpu")
    first = learner.train_policy(batch, partial(objective.loss, max_tokens=8), objective.needs_reference)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    second = learner.train_policy(batch, partial(objective.loss, max_tokens=8), objective.needs_reference)
    assert second["kl"] > 0
    no_ref = Learner(copy.deepcopy(tiny_model), LearnerConfig(lr=1e-3), 1, device="cpu")
    with pytest.raises(ValueError, match="reference model"):
        no_ref.train_policy(batch, partial(objective.loss, max_tokens=8), needs_reference=True)


def test_sft_learns_to_copy(tiny_model, tiny_tokenizer):
    """30 SFT steps on one fixed mapping drive the completion NLL down by more than half."""
    ids = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [(ids(f"{a}+{a}="), ids(str(2 * a)) + [tiny_tokenizer.eos_token_id]) for a in range(10, 42)]
    batch = make_sft_batch(pairs, tiny_tokenizer.pad_token_id)
    learner = Learner(tiny_model, LearnerConfig(lr=3e-3, micro_batch_size=16), total_steps=30, device="cpu")
    losses = [learner.train_step(batch, sft_loss)["nll"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_linear_logprobs_equals_the_full_head_forward_and_backward(compile_):
    # The chunked head must give the same logprobs and the same gradients as log_softmax over full logits,
    # eagerly and with its log-softmax and gradient compiled (whose label test is a compare, not a scatter;
    # symbolic shapes: the chunks of 3, 3 and 1 rows share one compile per direction).
    g = torch.Generator().manual_seed(0)
    rows = 7
    hidden = torch.randn(rows, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    want = torch.log_softmax(hidden @ weight.T / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    got = linear_logprobs(hidden, weight, labels, temperature=0.7, chunk_rows=3, compile=compile_, dynamic=True)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(got, want.float())
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_head_weight_gradient_in_bf16_on_gpu():
    # Under bf16 autocast the head's weight gradient is added chunk by chunk into a float32 total, by the matmul
    # itself where this torch can (`_adds_into_float32`), else by an add that upcasts: both give the float64
    # gradient of the same bf16-rounded inputs to bf16 precision, and the add into float32 equals adding the
    # float32 product.
    from winnow.learner.logprobs import _add_product

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    upstream = torch.randn(300, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_logprobs(hidden, weight, labels, chunk_rows=64)
    got_grad, = torch.autograd.grad((got * upstream).sum(), weight)
    h, w = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight))
    want = torch.log_softmax(h @ w.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    want_grad, = torch.autograd.grad((want * upstream.double()).sum(), w)
    assert got_grad.dtype == torch.float32
    assert (got_grad.double() - want_grad).norm() < 0.02 * want_grad.norm()  # bf16 logits' rounding, not more
    a = torch.randn(1000, 64, device="cuda", generator=g).bfloat16()
    b = torch.randn(64, 96, device="cuda", generator=g).bfloat16()
    total = torch.randn(1000, 96, device="cuda", generator=g)
    product = a.float() @ b.float()
    expected = total + product
    _add_product(total, a, b)
    assert (total - expected).norm() < 0.01 * product.norm()  # at most the product's bf16 rounding


def test_fused_head_sequence_logprobs_match_the_model_forward(tiny_model):
    torch.manual_seed(0)
    completions = [Completion([1, 2, 3], [4, 5], [-1.0, -1.0], "stop", ""),
                   Completion([6, 7], [8, 9, 10, 11], [-1.0] * 4, "length", "")]
    batch = make_train_batch(completions, torch.zeros(2), pad_token_id=0)
    assert can_fuse_head(tiny_model)
    plain = sequence_logprobs(tiny_model, batch, temperature=0.5)
    plain_grads = torch.autograd.grad(plain.sum(), list(tiny_model.parameters()))
    fused = sequence_logprobs(tiny_model, batch, temperature=0.5, fused_head=True)
    fused_grads = torch.autograd.grad(fused.sum(), list(tiny_model.parameters()))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_layers_and_fused_head_give_the_plain_update(tiny_model, tiny_tokenizer):
    """learner.compile (torch.compile per decoder layer) and fused_logprobs are speed only: one step's loss
    and gradients equal the plain learner's. (One micro-batch: every new input shape is a new compile,
    tens of seconds on CPU.)"""
    batch = _rl_batch(tiny_tokenizer)
    loss_fn = partial(GRPO().loss, max_tokens=8)
    results = []
    for compile_, fused in ((False, False), (True, True)):
        model = copy.deepcopy(tiny_model)
        config = LearnerConfig(lr=1e-3, micro_batch_size=8, compile=compile_, fused_logprobs=fused)
        metrics = Learner(model, config, total_steps=1, device="cpu").train_step(batch, loss_fn)
        results.append((metrics, [p.grad.clone() for p in model.parameters()]))
    (m1, p1), (m2, p2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="strategy 'single'"):
        LearnerConfig(compile=True, strategy="fsdp2")
    with pytest.raises(ValueError, match="add --learner.compile"):
        LearnerConfig(compile_dynamic=True)


def test_length_sorted_micro_batches_keep_preference_pairs_together(tiny_model, tiny_tokenizer):
    # Pairs whose two rows differ in length, in an order that sorting rows alone would scramble: every
    # micro-batch must hold whole pairs, chosen (advantage +1, here a marker) before rejected (-1), same pair id.
    g = torch.Generator().manual_seed(0)
    completions, markers, pair_ids = [], [], []
    for pair, (chosen_len, rejected_len) in enumerate([(1, 6), (5, 2), (3, 3), (7, 1)]):
        for marker, length in ((1.0, chosen_len), (-1.0, rejected_len)):
            response = torch.randint(3, 15, (length,), generator=g).tolist()
            completions.append(Completion([4, 5], response, [-1.0] * length, "stop", ""))
            markers.append(marker)
            pair_ids.append(float(pair))
    batch = make_train_batch(completions, torch.tensor(markers), torch.tensor(pair_ids), pad_token_id=0)
    seen = []

    def loss_fn(logprobs, micro, **_):
        assert micro.advantages[0::2].eq(1).all() and micro.advantages[1::2].eq(-1).all(), micro.advantages
        assert torch.equal(micro.rewards[0::2], micro.rewards[1::2]), micro.rewards
        seen.extend(micro.rewards[0::2].tolist())
        return (logprobs * micro.response_mask).sum() * 0, {}

    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(micro_batch_size=2), total_steps=1, device="cpu")
    learner.train_step(batch, loss_fn, rows_per_unit=2)
    # Pairs by their longer row, longest first: pair 3 (2 + 7 tokens), 0 (2 + 6), 1 (2 + 5), 2 (2 + 3).
    assert seen == [3.0, 0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="multiples of 2"):
        Learner(copy.deepcopy(tiny_model), LearnerConfig(micro_batch_size=3), total_steps=1,
                device="cpu").train_step(batch, loss_fn, rows_per_unit=2)
    # A token budget groups whole pairs too (an odd micro_batch_size is then unused): 32 tokens hold one pair of
    # 9-token rows (pair 3: 2 x 9 = 18), then two of 8 (pairs 0 and 1: 2 x 2 x 8 = 32), then pair 2.
    seen.clear()
    budgeted = Learner(copy.deepcopy(tiny_model), LearnerConfig(micro_batch_size=3, micro_batch_tokens=32),
                       total_steps=1, device="cpu")
    assert [mb.batch_size for mb in budgeted._micro_batches(batch, rows_per_unit=2)] == [2, 4, 2]
    budgeted.train_step(batch, loss_fn, rows_per_unit=2)
    assert seen == [3.0, 0.0, 1.0, 2.0]


def test_activation_bytes_per_token_and_budget_by_hand():
    from types import SimpleNamespace

    from winnow.learner.memory_budget import activation_bytes_per_token, budget_tokens

    # Qwen2.5-0.5B: 24 layers x (7 x 896 + 4 x 4864 + K and V of 2 heads x 64) values x 2 bytes
    qwen05 = SimpleNamespace(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                             num_key_value_heads=2)
    assert activation_bytes_per_token(qwen05) == 24 * (6272 + 19456 + 256) * 2 == 1_247_232
    # 0.5 x (10 GB free - 2 GB reserved) = 4 GB, at 1 MB a token: 4000 tokens; nothing free: still 1
    assert budget_tokens(0.5, 10_000_000_000, 2_000_000_000, 1_000_000) == 4000
    assert budget_tokens(0.5, 1_000, 2_000, 1_000_000) == 1


def test_memory_budget_sizes_micro_batches_from_free_memory(tiny_model, tiny_tokenizer, monkeypatch):
    """The budget follows the memory free at the step: rows of 7, 7, 6, 6, 5, 5, 4, 3 tokens make one micro-batch
    with room for 56 tokens, and [7] [7] [6 6] [5 5] [4 3] with room for 12; the step logs the budget it used."""
    from winnow.learner import memory_budget

    batch = _rl_batch(tiny_tokenizer)
    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(lr=1e-3), total_steps=2, device="cpu")
    learner.config = LearnerConfig(lr=1e-3, micro_batch_memory=0.5)  # as on a GPU (refused on CPU, below)
    per_token = memory_budget.activation_bytes_per_token(tiny_model.config)
    reserve = memory_budget.step_reserve_bytes(learner.model, tiny_model.config.vocab_size)
    loss_fn = partial(GRPO().loss, max_tokens=8)
    for tokens, expected_micro_batches in ((56, 1), (12, 5)):
        learner.model.zero_grad(set_to_none=True)  # as a step starts: the gradients are still to be allocated
        free = reserve + 2 * tokens * per_token  # half of it for activations: `tokens` tokens
        monkeypatch.setattr(memory_budget, "free_device_bytes", lambda device, free=free: free)
        assert learner.token_budget() == tokens
        assert len(list(learner._micro_batches(batch))) == expected_micro_batches
        assert learner.train_step(batch, loss_fn)["micro_batch_tokens"] == tokens


def test_memory_budget_needs_a_gpu_and_excludes_a_token_budget(tiny_model):
    with pytest.raises(ValueError, match="runs on cpu: give --learner.micro-batch-tokens instead"):
        Learner(tiny_model, LearnerConfig(micro_batch_memory=0.5), total_steps=1, device="cpu")
    with pytest.raises(ValueError, match="give one of them"):
        LearnerConfig(micro_batch_memory=0.5, micro_batch_tokens=1000)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        LearnerConfig(micro_batch_memory=1.5)


# ---------------------------------------------------------------------- the first forward run while scoring

def _counting_forward(learner: Learner) -> list[int]:
    """Count the learner's forward calls (a list, so the caller sees the count grow)."""
    calls, forward = [], learner.forward

    def counted(model, batch):
        calls.append(batch.batch_size)
        return forward(model, batch)

    learner.forward = counted
    return calls


@pytest.mark.parametrize("share_prompts", [False, True])
def test_forward_run_ahead_gives_the_same_step_bit_for_bit(tiny_model, tiny_tokenizer, share_prompts):
    """The first micro-batch's forward, run before the batch has its advantages, then its loss and backward once
    they exist: the same parameters after the step, to the bit, as the step run in one go, and one forward fewer
    in the step itself (the one run ahead is used, not run again)."""
    batch = _rl_batch(tiny_tokenizer)
    batch.group_index = torch.arange(8) // 4
    loss_fn = partial(GRPO().loss, max_tokens=8)
    config = LearnerConfig(lr=1e-2, micro_batch_size=3, share_prompts=share_prompts)
    results = []
    for run_ahead in (False, True):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, config, total_steps=1, device="cpu")
        calls = _counting_forward(learner)
        torch.manual_seed(3)  # the step's row order is drawn from it
        if run_ahead:
            pending = copy.copy(batch)
            pending.advantages = torch.zeros(8)  # not known yet when the forward runs
            ahead = learner.forward_ahead(pending)
            assert ahead is not None and ahead.outputs.requires_grad and calls == [3]
            pending.advantages = batch.advantages
            metrics = learner.train_policy(pending, loss_fn, ahead=ahead)
        else:
            metrics = learner.train_policy(batch, loss_fn)
        results.append((metrics, calls, [p.detach().clone() for p in model.parameters()]))
    (m1, c1, p1), (m2, c2, p2) = results
    assert c1 == [3, 3, 2] and c2 == [3, 3, 2]  # three micro-batches each; the first one ahead of the step
    assert m1 == m2 and m1["loss"] != 0.0
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not all(torch.equal(a, b) for a, b in zip(p1, tiny_model.parameters()))  # the step moved them


def test_forward_ahead_only_where_the_step_is_one_pass(tiny_model, tiny_tokenizer):
    batch = _rl_batch(tiny_tokenizer)
    for fields in (dict(num_mini_batches=2), dict(num_epochs=2), dict(forward_while_scoring=False)):
        learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(**fields), total_steps=1, device="cpu")
        assert learner.forward_ahead(batch) is None, fields
    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(), total_steps=1, device="cpu")
    ahead = learner.forward_ahead(batch)
    with pytest.raises(ValueError, match="a forward run ahead for another batch"):
        learner.train_policy(copy.copy(batch), partial(GRPO().loss, max_tokens=8), ahead=ahead)


class _ReplayActor:
    """An actor that returns the same completions every iteration (the engine is not what this tests), and
    refuses to generate while asleep, as a sleeping vLLM engine cannot."""

    def __init__(self, completions):
        self.completions, self.sleeps, self.asleep = completions, 0, False

    def generate(self, prompts, params):
        assert not self.asleep, "generate while asleep"
        return [copy.copy(c) for c in self.completions]

    def sleep(self):
        self.sleeps, self.asleep = self.sleeps + 1, True

    def wake(self):
        self.asleep = False

    def sync(self, learner, config, probe, seed):
        return {}


@pytest.mark.parametrize("scored", ["all", "one_unscored"])
def test_rl_family_trains_the_forward_run_while_scoring_or_throws_it_away(tiny_model, tiny_tokenizer, scored):
    """The RL family launches the learner's first forward before scoring. With every sample scored it trains on
    it (`train/forward_while_scoring` 1); with a sample left unscored the batch has other rows, so that forward
    is thrown away and the step runs as before. The weights equal a run without it to the bit when it trained;
    else the gradients do, up to float rounding (the thrown-away forward drew a row order, the step another; Adam's
    first step, lr x sign(g), would magnify that rounding on tiny gradients)."""
    from winnow.loops import PhaseTimer, RLFamily, RolloutConfig
    from winnow.oracles.functions import FunctionOracle
    from winnow.types import Prompt

    prompts = [Prompt("a", [3, 4]), Prompt("b", [5, 6, 7])]
    completions = [Completion(p.token_ids, [8 + i, 9, 10][: 1 + i % 3], [-1.0] * (1 + i % 3), "stop",
                              f"{p.text}{i}") for p in prompts for i in range(4)]

    def reward(prompts, completions, **_):
        return [None if scored == "one_unscored" and c == "b1" else float(c[-1]) % 3 for c in completions]

    results = []
    for run_ahead in (False, True):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, LearnerConfig(lr=1e-2, micro_batch_size=3, forward_while_scoring=run_ahead),
                          total_steps=1, device="cpu")
        actor = _ReplayActor(completions)
        family = RLFamily(actor=actor, learner=learner, oracle=FunctionOracle([("r", reward, 1.0)], max_retries=0),
                          objective=GRPO(), rollout=RolloutConfig(max_tokens=3, num_samples=4), eval_config=None,
                          prompts=iter([prompts]), eval_prompts=[], seed=0, pad_token_id=tiny_tokenizer.pad_token_id)
        torch.manual_seed(0)
        batch, _ = family.collect(1, PhaseTimer())
        metrics = family.train(batch)
        results.append((metrics, actor.sleeps, [p.detach().clone() for p in model.parameters()],
                        [p.grad.clone() for p in model.parameters()]))
    (m1, s1, p1, g1), (m2, s2, p2, g2) = results
    assert batch.batch_size == (8 if scored == "all" else 7)
    assert "forward_while_scoring" not in m1
    assert m2.get("forward_while_scoring") == (1.0 if scored == "all" else None)
    assert (s1, s2) == (1, 1)  # the actor slept before scoring, in both
    if scored == "all":
        assert m1["loss"] == m2["loss"] and all(torch.equal(a, b) for a, b in zip(p1, p2))
    else:
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_loop_wakes_an_actor_the_family_put_to_sleep_when_nothing_trains(tiny_model, tiny_tokenizer, tmp_path):
    """The RL family lets the actor sleep before scoring. An iteration with nothing to train (every sample
    unscored) never reaches the sync that wakes it, so the loop wakes it itself: the next iteration generates
    awake and trains, on the forward it ran while scoring."""
    from winnow.loops import Loop, RLFamily, RolloutConfig
    from winnow.oracles.functions import FunctionOracle
    from winnow.types import Prompt

    prompts = [Prompt("a", [3, 4])]
    actor = _ReplayActor([Completion([3, 4], [5 + i], [-1.0], "stop", str(i)) for i in range(4)])
    scorable = [False]

    def reward(prompts, completions, **_):
        return [float(c) if scorable[0] else None for c in completions]

    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(lr=1e-2), total_steps=2, device="cpu")
    family = RLFamily(actor=actor, learner=learner, oracle=FunctionOracle([("r", reward, 1.0)], max_retries=0),
                      objective=GRPO(), rollout=RolloutConfig(max_tokens=1, num_samples=4), eval_config=None,
                      prompts=iter([prompts, prompts]), eval_prompts=[], seed=0,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    loop = Loop(family, learner=learner, actor=actor, num_iterations=2, eval_every=0, logger=_NoLogger(),
                run_dir=tmp_path)
    first = loop.step(1)
    scorable[0] = True
    second = loop.step(2)
    assert first["oracle/unscored"] == 4.0 and "train/loss" not in first
    assert second["train/forward_while_scoring"] == 1.0 and learner.num_steps == 1
    assert actor.sleeps == 3  # before each scoring, and the loop's own before the train step (a no-op twice)


class _NoLogger:
    def log(self, row, step=None):
        pass
