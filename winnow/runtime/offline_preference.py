"""Offline preference optimisation (plain DPO and friends) from a `{prompt, chosen, rejected}` dataset.

`winnow train dpo --offline --data.train pairs.jsonl`: each iteration trains on `rollout.prompts_per_iteration`
pairs drawn from an endless shuffled stream. Held-out pairs (the data's eval split, or `data.eval_fraction` of
the rows) are scored every `eval.every` iterations without gradients: `eval/pair_loss`, `eval/reward_accuracy`
(fraction of pairs whose implicit reward prefers the chosen response) and `eval/reward_margin`. No oracle is
queried: the labels are the dataset's.
"""
from __future__ import annotations

import dataclasses

import torch

from winnow.data import batches, load_prompts
from winnow.learner.learner import Learner
from winnow.learner.pairs import make_pair_batch, train_pairs
from winnow.runtime.local import PhaseTimer
from winnow.types import Completion, PreferencePair, Prompt


def dataset_pairs(prompts: list[Prompt], tokenizer, source: str) -> list[PreferencePair]:
    """Pairs from prompts whose rows have `chosen` and `rejected` columns (non-empty strings); EOS is appended
    to both responses, as SFT does, so the policy learns where a preferred answer ends."""
    pairs = []
    for p in prompts:
        sides = []
        for column in ("chosen", "rejected"):
            text = p.columns.get(column)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{source}, row {p.index}: {column!r} must be a non-empty string, got {text!r}; "
                                 f"offline preference data has rows {{\"prompt\": ..., \"chosen\": ..., "
                                 f"\"rejected\": ...}}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sides.append(Completion(p.token_ids, ids, [0.0] * len(ids), "stop", text))
        pairs.append(PreferencePair(p, sides[0], sides[1]))
    return pairs


def run_offline(config, *, learner: Learner, tokenizer, logger, run_dir, progress=None) -> list[dict]:
    """Train on dataset pairs for `config.num_iterations` iterations; returns the logged rows."""
    data = dataclasses.replace(config.data, answer_column=None)  # the labels are chosen/rejected, not an answer
    train = dataset_pairs(load_prompts(data, tokenizer, "train"), tokenizer, data.train)
    held_out = dataset_pairs(load_prompts(data, tokenizer, "eval"), tokenizer, data.eval or data.train)
    held_out = held_out[: config.eval.max_prompts]
    stream = batches(train, config.rollout.prompts_per_iteration, seed=config.seed)
    pad, objective, history = tokenizer.pad_token_id, config.algo, []
    for iteration in range(config.num_iterations + 1):
        timer, metrics = PhaseTimer(), {}
        if iteration > 0:
            with timer("train"):
                train_metrics = train_pairs(learner, make_pair_batch(next(stream), pad), objective)
                metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
        every = config.eval.every
        if held_out and (iteration in (0, config.num_iterations) or (every > 0 and iteration % every == 0)):
            with timer("eval"):
                metrics.update(evaluate_pairs(learner, make_pair_batch(held_out, pad), objective))
        steps = iteration * config.learner.num_mini_batches * config.learner.num_epochs
        row = {**metrics, "counts/pairs": float(iteration * config.rollout.prompts_per_iteration),
               "counts/optimizer_steps": float(steps), **{f"time/{k}": s for k, s in timer.seconds.items()}}
        logger.log(row, step=iteration)
        history.append(row)
        if progress is not None:
            progress.update(0 if iteration == 0 else 1)
    return history


@torch.no_grad()
def evaluate_pairs(learner: Learner, batch, objective) -> dict[str, float]:
    """The objective's loss and implicit-reward metrics on held-out pairs, without gradients."""
    batch = batch.to(learner.device)
    if objective.needs_reference:
        batch.ref_logprobs = learner.reference_logprobs(batch)
    logprobs = learner.logprobs(learner.model, batch)
    loss, metrics = objective.loss(logprobs, batch, num_sequences=batch.batch_size,
                                   num_tokens=max(batch.num_response_tokens, 1))
    return {"eval/pair_loss": float(loss), "eval/reward_accuracy": metrics["pref/reward_accuracy"],
            "eval/reward_margin": metrics["pref/reward_margin"]}
