"""Prompt sharing in the learner: the packed layout and its segments by hand, the segment kernel against the dense
mask, and the same logprobs, gradients and optimizer step as separate rows."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from winnow.algorithms import GRPO
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig, _by_group, _packed_budget_sizes
from winnow.learner.logprobs import sequence_logprobs
from winnow.learner.shared_prompts import (_expand, _power_of_two, _prompt_leads, _segment_attention, _segments,
                                           segment_attention, shared_layout)
from winnow.types import Completion

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length kernel needs a GPU")


def test_layout_by_hand():
    # Rows [prompt | response]: [1 2 | 3 4], [5 | 6], [1 2 | 7], [9 | ] (no response: nothing to train).
    completions = [Completion([1, 2], [3, 4], [0.0] * 2, "stop", ""), Completion([5], [6], [0.0], "stop", ""),
                   Completion([1, 2], [7], [0.0], "stop", ""), Completion([9], [], [], "stop", "")]
    layout = shared_layout(make_train_batch(completions, torch.zeros(4), pad_token_id=0))
    # Packed: prompt [1 2] once, row 0's [3 4], row 2's [7], then prompt [5] and row 1's [6]; no padding.
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 7, 5, 6]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]  # row 2's 7 sits at position 2, as in its row
    # Each label is predicted by the token before it in its own sequence: the first by the shared prompt's last.
    assert layout.labels.tolist() == [3, 4, 7, 6]
    assert layout.sources.tolist() == [1, 2, 1, 5]
    assert list(zip(layout.rows.tolist(), layout.columns.tolist())) == [(0, 2), (0, 3), (2, 2), (1, 1)]
    assert layout.num_shared_tokens == 2
    mask = layout.attention[0, 0]
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 4]  # row 2's response: the prompt and itself
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert mask[6].nonzero().flatten().tolist() == [5, 6]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]  # a prompt token: causal within the prompt


def test_segment_keys_by_hand():
    # The same packed row as above, as the variable-length kernel's segments: [1 2] [3 4] [7] [5] [6].
    segments = _segments(lengths=[4, 2, 3, 1], prompt_lens=[2, 1, 2, 1], leads=[0, 1, 0, 3])
    assert segments["length"] == [2, 2, 1, 1, 1] and segments["prompt_length"] == [0, 2, 2, 0, 1]
    seg = {name: torch.tensor(values) for name, values in segments.items()}
    attention = _segment_attention(segments, seg, "cpu")
    assert attention.cu_seq_q.tolist() == [0, 2, 4, 5, 6, 7]
    # keys: the prompt [0 1]; row 0's prompt then own [0 1 2 3]; row 2's [0 1 4]; [5]; row 1's [5 6]
    assert attention.cu_seq_k.tolist() == [0, 2, 6, 9, 10, 12]
    assert attention.key_index.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 5, 6]
    assert (attention.max_q, attention.max_k) == (128, 128)  # 2 and 4, rounded up: one compile serves many lengths
    assert _power_of_two(129) == 256 and _power_of_two(640) == 1024


def test_layout_does_not_apply_to_packed_left_padded_or_unlabelled_rows():
    batch = make_train_batch([Completion([1, 2], [3], [0.0], "stop", "")], torch.zeros(1), pad_token_id=0)
    left_padded = copy.copy(batch)
    left_padded.attention_mask = torch.tensor([[0, 1, 1]])
    assert shared_layout(left_padded) is None
    packed = copy.copy(batch)
    packed.position_ids = torch.tensor([[0, 1, 2]])
    assert shared_layout(packed) is None
    padding = copy.copy(batch)  # a sharded rank's padding rows: no response token to label
    padding.response_mask = torch.zeros_like(batch.response_mask)
    assert shared_layout(padding) is None


def _grouped_batch(tokenizer, group_sizes=(3, 1, 4, 2), seed=0):
    """Groups of samples answering one prompt each (prompts of 2-4 tokens, responses of 1-5), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    completions, group_index = [], []
    for index, size in enumerate(group_sizes):
        prompt = torch.randint(3, 15, (2 + index % 3,), generator=g).tolist()
        for _ in range(size):
            response = torch.randint(3, 15, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            completions.append(Completion(prompt, response, [-2.0] * len(response), "stop", ""))
            group_index.append(index)
    batch = make_train_batch(completions, torch.randn(len(completions), generator=g),
                             pad_token_id=tokenizer.pad_token_id, group_index=torch.tensor(group_index))
    return batch.select(torch.randperm(batch.batch_size, generator=g))


@pytest.mark.parametrize("fused_head", [True, False])
def test_same_logprobs_and_gradients_as_separate_rows(tiny_model, tiny_tokenizer, fused_head):
    batch = _grouped_batch(tiny_tokenizer)
    weights = torch.linspace(-1, 1, batch.input_ids.shape[1])
    results = []
    for share in (False, True):
        tiny_model.zero_grad()
        logprobs = sequence_logprobs(tiny_model, batch, temperature=0.7, fused_head=fused_head, share_prompts=share)
        (logprobs * weights).sum().backward()
        results.append((logprobs, [p.grad.clone() for p in tiny_model.parameters()]))
    (separate, g1), (shared, g2) = results
    # Prompts of 2, 3, 4, 2 tokens in groups of 3, 1, 4, 2 rows: each group runs its prompt once, not size times.
    assert separate.abs().sum() > 0 and shared_layout(batch).num_shared_tokens == 2 * 2 + 3 * 0 + 4 * 3 + 2 * 1
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@needs_cuda
def test_segment_attention_equals_the_dense_mask_on_gpu():
    """The variable-length kernel over the segments computes what SDPA computes with the dense mask."""
    completions, g = [], torch.Generator().manual_seed(0)
    for prompt_len, sizes in [(300, [200, 100]), (5, [3]), (70, [90, 40])]:
        prompt = torch.randint(3, 15, (prompt_len,), generator=g).tolist()
        completions += [Completion(prompt, [4] * size, [0.0] * size, "stop", "") for size in sizes]
    batch = make_train_batch(completions, torch.zeros(len(completions)), pad_token_id=0).to("cuda")
    layout = shared_layout(batch)
    segments = _segments(*[values.tolist() for values in (batch.attention_mask.sum(1),
                                                           batch.response_mask.argmax(1),
                                                           torch.tensor([0, 0, 2, 3, 3]))])
    dense = _expand(batch, segments, use_kernel=False).attention
    q, k, v = (torch.randn(1, heads, 808, 64, generator=g).cuda().bfloat16() for heads in (4, 2, 2))
    got = segment_attention(q, k, v, layout.attention, scale=0.125)  # [L, H, D]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.125, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_cuda
def test_grouped_query_kernel_equals_repeated_heads_on_gpu(monkeypatch):
    """Fewer K/V heads given to the kernel as they are: the output and every gradient as with K/V repeated."""
    import winnow.learner.shared_prompts as shared

    completions, g = [], torch.Generator().manual_seed(1)
    for prompt_len, sizes in [(40, [30, 7, 12]), (9, [50])]:
        prompt = torch.randint(3, 15, (prompt_len,), generator=g).tolist()
        completions += [Completion(prompt, [4] * size, [0.0] * size, "stop", "") for size in sizes]
    layout = shared_layout(make_train_batch(completions, torch.zeros(len(completions)), pad_token_id=0).to("cuda"))
    length = layout.input_ids.shape[1]
    inputs = [torch.randn(1, heads, length, 64, generator=g).cuda().bfloat16() for heads in (6, 2, 2)]
    results = []
    for gqa in (True, False):
        monkeypatch.setattr(shared, "GQA_KERNEL", gqa)
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = segment_attention(q, k, v, layout.attention, scale=0.125)
        out.float().square().sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_packed_token_budget_by_hand():
    # Group 0: prompt 3, responses 5, 4, 1; group 1: prompt 2, responses 6, 6. Budget 12 packed tokens:
    # [3 + 5 + 4 = 12], [3 + 1 (its prompt again) + 2 + 6 = 12], [2 + 6].
    assert _packed_budget_sizes([3, 3, 3, 2, 2], [5, 4, 1, 6, 6], [0, 0, 0, 1, 1], 12) == [2, 2, 1]
    assert _packed_budget_sizes([3], [20], [0], 12) == [1]  # longer than the budget: alone


def test_prompt_leads_and_group_order_by_hand():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 9], [1, 7, 7]])
    # Rows 0 and 2 share prompt [1 2]; row 3's prompt is [1] (one token), not the same.
    assert _prompt_leads(ids, torch.tensor([2, 2, 2, 1])).tolist() == [0, 1, 0, 3]
    # Groups 7 (rows 0, 2: longest 5), 3 (rows 1, 3: longest 9): group 3 first, each group's rows together.
    order, lengths = _by_group(torch.tensor([7, 3, 7, 3]), torch.tensor([4, 9, 5, 2]))
    assert order.tolist() == [1, 3, 0, 2] and lengths.tolist() == [9, 9, 5, 5]


@pytest.mark.parametrize("fields", [dict(micro_batch_size=3), dict(micro_batch_tokens=40)])
def test_learner_step_is_the_same_with_shared_prompts(tiny_model, tiny_tokenizer, fields):
    """The optimizer step with shared prompts equals the step over separate rows: loss, gradient norm, gradients,
    and the no-grad logprobs; a group's rows train in one micro-batch where it fits."""
    batch = _grouped_batch(tiny_tokenizer)
    loss_fn = partial(GRPO().loss, max_tokens=8)
    results = []
    for share in (False, True):
        model = copy.deepcopy(tiny_model)
        learner = Learner(model, LearnerConfig(lr=1e-3, share_prompts=share, **fields), total_steps=1, device="cpu")
        micro_batches = list(learner._micro_batches(batch))
        groups = [mb.group_index.tolist() for mb in micro_batches]
        if share and "micro_batch_tokens" in fields:  # the budget counts packed tokens
            assert all(mb.batch_size == 1 or shared_layout(mb).input_ids.shape[1] <= 40 for mb in micro_batches)
        logprobs = learner.logprobs(model, batch)
        metrics = learner.train_step(batch, loss_fn)
        results.append((groups, logprobs, metrics, [p.grad.clone() for p in model.parameters()]))
    (_, lp1, m1, g1), (groups, lp2, m2, g2) = results
    runs = [g for mb in groups for i, g in enumerate(mb) if i == 0 or mb[i - 1] != g]
    assert sorted(sum(groups, [])) == sorted(batch.group_index.tolist())  # every row once
    assert len(runs) - len(set(runs)) < len(groups)  # a group is split only where a micro-batch ends
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=1e-5)
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_shared_prompts_step_matches_separate_rows_on_gpu(tiny_model, tiny_tokenizer, compile):
    """On a GPU the packed rows run the variable-length kernel, forward and backward."""
    batch = _grouped_batch(tiny_tokenizer, group_sizes=(8, 8, 3, 5), seed=1)
    loss_fn = partial(GRPO().loss, max_tokens=8)
    results = []
    for share in (False, True):
        model = copy.deepcopy(tiny_model).cuda()
        config = LearnerConfig(lr=1e-3, share_prompts=share, compile=compile, micro_batch_size=16)
        learner = Learner(model, config, total_steps=1, device="cuda")
        metrics = learner.train_step(batch.to("cuda"), loss_fn)
        results.append((metrics, [p.grad.float().clone() for p in model.parameters()]))
    (m1, g1), (m2, g2) = results
    # bf16 autocast: the two ways round differently, so compare each gradient's relative difference.
    assert m2["loss"] == pytest.approx(m1["loss"], rel=2e-2, abs=1e-4)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=2e-2)
    for a, b in zip(g1, g2):
        assert float((b - a).norm()) <= 0.03 * float(a.norm()) + 1e-6
