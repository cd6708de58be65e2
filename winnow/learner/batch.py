"""Turning sampled completions into a padded `TrainBatch`."""
from __future__ import annotations

from itertools import chain

from winnow.lazy import lazy_import
from winnow.types import Completion, Episode, PreferencePair, TrainBatch

np = lazy_import("numpy")
torch = lazy_import("torch")


def make_train_batch(
    completions: list[Completion],
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    pad_token_id: int = 0,
    *,
    group_index: torch.Tensor | None = None,
) -> TrainBatch:
    """Concatenate prompt + response for every completion and right-pad to the longest.

    advantages, rewards, group_index: [B] aligned with `completions` (advantages default to zeros, to be
    filled by the objective). Responses that are empty (a stop string can end a response at once) get an
    all-zero mask.
    """
    if advantages is None:
        advantages = torch.zeros(len(completions))
    if len(completions) != len(advantages):
        raise ValueError(f"{len(completions)} completions but {len(advantages)} advantages")
    if any(len(c.logprobs) != len(c.response_ids) for c in completions):
        raise ValueError("a completion has a different number of logprobs than response tokens")
    # Masks and scatter in numpy: torch's CPU kernels for them (compares, casts, full, sum, index_put over a mask)
    # took ~15 of this function's ~45 ms at 512 x 640 on a 2-core host, several times that on a busy one (each
    # wakes a thread pool); numpy's take ~1 ms. Most of the rest is reading the lists (`_into_rows`).
    prompt_lens = np.array([len(c.prompt_ids) for c in completions], dtype=np.int64)  # [B]
    ends = prompt_lens + np.array([len(c.response_ids) for c in completions], dtype=np.int64)  # [B]
    columns = np.arange(ends.max())  # [T]
    is_token = columns < ends[:, None]  # [B, T]
    is_response = (columns >= prompt_lens[:, None]) & is_token  # [B, T]
    input_ids = _into_rows(chain.from_iterable(chain(c.prompt_ids, c.response_ids) for c in completions), is_token,
                           np.int64, fill=pad_token_id)
    engine_logprobs = _into_rows(chain.from_iterable(c.logprobs for c in completions), is_response, np.float32)
    attention_mask = torch.from_numpy(is_token.astype(np.int64))
    response_mask = torch.from_numpy(is_response.astype(np.float32))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages.float(),
        engine_logprobs=engine_logprobs,
        rewards=None if rewards is None else rewards.float(),
        group_index=group_index,
    )


def _into_rows(values, where: np.ndarray, dtype, fill: float = 0) -> torch.Tensor:
    """The rows' values laid end to end (an iterable of numbers, row after row), placed where `where` [B, T] (bool)
    is True, `fill` elsewhere: one array for the whole batch, not a tensor per row (a per-row loop cost ~0.2 ms a
    sample, most of a 512-sample iteration's "advantages" phase)."""
    out = np.full(where.shape, fill, dtype=dtype)
    out[where] = np.fromiter(values, dtype, count=int(np.count_nonzero(where)))
    return torch.from_numpy(out)


def make_episode_batch(episodes: list[Episode], pad_token_id: int = 0, *,
                       group_index: torch.Tensor | None = None) -> TrainBatch:
    """One row per episode, right-padded: the loss mask is the episode's policy mask, so the environment's tokens
    (observations, chat markup) are context the model reads and never a target. `rewards` [B] are the episode
    returns; `turn_rewards` [B, T] put each turn's reward on its last policy token."""
    if not episodes:
        raise ValueError("make_episode_batch got no episodes")
    if any(not len(e.token_ids) == len(e.policy_mask) == len(e.logprobs) for e in episodes):
        raise ValueError("an episode's token_ids, policy_mask and logprobs differ in length")
    ends = np.array([len(e.token_ids) for e in episodes], dtype=np.int64)  # [B]
    is_token = np.arange(ends.max()) < ends[:, None]  # [B, T]
    input_ids = _into_rows(chain.from_iterable(e.token_ids for e in episodes), is_token, np.int64, pad_token_id)
    response_mask = _into_rows(chain.from_iterable(e.policy_mask for e in episodes), is_token, np.float32)
    engine_logprobs = _into_rows(chain.from_iterable(e.logprobs for e in episodes), is_token, np.float32)
    attention_mask, batch_size = torch.from_numpy(is_token.astype(np.int64)), len(episodes)
    turn_rewards = torch.zeros(is_token.shape, dtype=torch.float32)
    for row, e in enumerate(episodes):  # a few turns per episode
        for end, reward in zip(e.turn_ends, e.turn_rewards):
            turn_rewards[row, end] += reward
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                      advantages=torch.zeros(batch_size), engine_logprobs=engine_logprobs,
                      rewards=torch.tensor([e.episode_return for e in episodes], dtype=torch.float32),
                      group_index=group_index, turn_rewards=turn_rewards)


def make_sft_batch(
    pairs: list[tuple[list[int], list[int]]], pad_token_id: int = 0
) -> TrainBatch:
    """A TrainBatch for supervised fine-tuning: loss on the completion tokens of each (prompt, completion)."""
    completions = [
        Completion(prompt_ids=p, response_ids=c, logprobs=[0.0] * len(c), finish_reason="stop", text="")
        for p, c in pairs
    ]
    return make_train_batch(completions, torch.zeros(len(pairs)), pad_token_id=pad_token_id)


def make_pair_batch(pairs: list[PreferencePair], pad_token_id: int = 0) -> TrainBatch:
    """A TrainBatch of 2 x len(pairs) rows, [chosen_0, rejected_0, chosen_1, rejected_1, ...]; `rewards` [2P]
    holds each pair's preference probability on both of its rows (for logging); `sampled_by_reference` [2P]
marks the rows the reference policy sampled (XPO), when there are any. The learner moves the rows of
    a pair together (`rows_per_unit=2`), so a preference loss always sees both sides of a pair at once."""
    if not pairs:
        raise ValueError("make_pair_batch got no pairs")
    completions = [c for pair in pairs for c in (pair.chosen, pair.rejected)]
    probability = torch.tensor([pair.probability for pair in pairs for _ in range(2)])
    batch = make_train_batch(completions, torch.zeros(len(completions)), probability, pad_token_id)
    if any(c.sampled_by == "reference" for c in completions):
        batch.sampled_by_reference = torch.tensor([float(c.sampled_by == "reference") for c in completions])
    return batch


def make_chat_batch(examples: list[tuple[list[int], list[int]]], pad_token_id: int = 0,
                    pack_length: int | None = None) -> TrainBatch:
    """A TrainBatch for chat SFT from (token ids, assistant mask) examples; the loss falls where the mask is 1.

    pack_length None: one example per row, right-padded. Otherwise examples are packed first-fit, in order, into
    rows of at most `pack_length` tokens, with `position_ids` restarting at each example so that no example
    attends to another (see `TrainBatch.position_ids`); the loss is then the same as unpacked, with fewer
    padding tokens. Token 0 of an example is never a target (nothing precedes it in its own sequence).
    """
    if not examples:
        raise ValueError("make_chat_batch got no examples")
    rows: list[list[tuple[list[int], list[int]]]] = []
    if pack_length is None:
        rows = [[example] for example in examples]
    else:
        used: list[int] = []
        for ids, mask in examples:
            if len(ids) > pack_length:
                raise ValueError(f"an example of {len(ids)} tokens does not fit a packed row of {pack_length}")
            fit = next((r for r, n in enumerate(used) if n + len(ids) <= pack_length), None)
            if fit is None:  # no row has room: open a new one
                fit = len(rows)
                rows.append([])
                used.append(0)
            rows[fit].append((ids, mask))
            used[fit] += len(ids)
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.float32)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ids, mask in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            attention_mask[r, start:end] = 1
            response_mask[r, start + 1 : end] = torch.tensor(mask[1:], dtype=torch.float32)
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(length - start)  # padding: a sequence of its own, never trained on
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                      advantages=torch.zeros(len(rows)), engine_logprobs=torch.zeros((len(rows), length)),
                      position_ids=position_ids if pack_length is not None else None)
