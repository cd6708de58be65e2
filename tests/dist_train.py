"""Train the tiny model a few steps on one fixed batch and write the losses to JSON (for test_strategies.py).

    python tests/dist_train.py --strategy single --out single.json
    torchrun --nproc-per-node 2 tests/dist_train.py --strategy fsdp2 --out fsdp2.json [--save-at 2 --ckpt DIR]
    torchrun --nproc-per-node 2 tests/dist_train.py --strategy fsdp2 --out resumed.json --load DIR

Every rank trains on its shard of the same 10-sequence batch (`Learner.shard`), so the losses must match
the single-process run on the whole batch. The loss is a GRPO surrogate (normalised per sequence, so it
tests the all-reduced `num_sequences`) plus a token-mean NLL (tests the all-reduced `num_tokens`); the
old logprobs are fixed, so the ratio, the clipping and the loss change as the weights do.
"""
from __future__ import annotations

import argparse
import json
import torch

from winnow.algorithms import GRPO
from winnow.data.tiny import build_tiny_model, train_char_tokenizer
from winnow.learner import fsdp
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.strategy import StrategyConfig
from winnow.types import Completion


def fixed_batch(num: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 15, (2 + i,), generator=g).tolist() for i in range(3)]
    completions = []
    for i in range(num):  # rows i, i + 3, i + 6, ... answer one prompt (a group, as a GRPO rollout's samples)
        response = torch.randint(3, 15, (1 + i % 4,), generator=g).tolist()
        completions.append(Completion(prompts[i % 3], response, [-2.5] * len(response), "stop", ""))
    batch = make_train_batch(completions, torch.randn(num, generator=g), pad_token_id=0,
                             group_index=torch.arange(num) % 3)
    batch.old_logprobs = batch.engine_logprobs.clone()
    return batch


def make_loss_fn():
    grpo = GRPO()

    def loss_fn(logprobs, batch, *, num_sequences, num_tokens):
        policy, metrics = grpo.loss(logprobs, batch, num_sequences=num_sequences, num_tokens=num_tokens, max_tokens=4)
        nll = -(logprobs * batch.response_mask).sum() / num_tokens
        return policy + nll, {**metrics, "nll": float(nll.detach())}

    return loss_fn


def _position_sum(tensor: torch.Tensor) -> float:
    """A checksum that moves when elements trade places (a plain sum would not): sum of x_i cos(i)."""
    flat = tensor.detach().double().flatten()
    return float((flat * torch.arange(flat.numel(), dtype=torch.float64).cos()).sum())


def train(strategy: str = "single", *, zero_stage: int = 2, offload: bool = False, steps: int = 4,
          save_at: int = 0, ckpt: str | None = None, load: str | None = None, save_pretrained: str | None = None,
          device: str = "cpu", micro_batch_tokens: int = 0, share_prompts: bool = False) -> dict:
    """Run the steps; returns {"steps": [{loss, grad_norm, lr, step}], "weight_sums": {name: sum}}."""
    tokenizer = train_char_tokenizer(["0123456789+-*= "])
    config = LearnerConfig(lr=3e-3, warmup_steps=2, lr_schedule="linear", micro_batch_size=2, max_grad_norm=1.0,
                           micro_batch_tokens=micro_batch_tokens, share_prompts=share_prompts, strategy=strategy,
                           sharding=StrategyConfig(zero_stage=zero_stage, offload=offload))
    # an odd intermediate size: two ranks hold uneven shards of the MLP weights (one row fewer on rank 1)
    model = build_tiny_model(tokenizer, seed=0, intermediate_size=511)
    learner = Learner(model, config, total_steps=8, device=device)
    if load:
        learner.load_checkpoint(load)
    batch, loss_fn = learner.shard(fixed_batch().to(learner.device)), make_loss_fn()
    rows = []
    for _ in range(steps):
        metrics = learner.train_step(batch, loss_fn)
        rows.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                     "step": learner.num_steps})
        if save_at and learner.num_steps == save_at:
            learner.save_checkpoint(ckpt)
    weight_sums = {name: _position_sum(t) for name, t in learner.named_weights()}
    # as an engine in bf16 gets them: a sharded strategy gathers bf16 shards, one process casts on the way; FSDP2
    # in buckets of a few KB here, so that buckets end inside the model and a tensor may fill several
    fsdp.GATHER_BUCKET_BYTES = 4096
    bf16 = list(learner.named_weights(gather_dtype=torch.bfloat16))
    bf16_sums = {name: _position_sum(t.to(torch.bfloat16)) for name, t in bf16}
    gathered_dtypes = sorted({str(t.dtype) for _, t in bf16})
    if save_pretrained:
        learner.save(save_pretrained, tokenizer)
    return {"steps": rows, "weight_sums": weight_sums, "bf16_sums": bf16_sums, "gathered_dtypes": gathered_dtypes,
            "is_main": learner.is_main,
            "world_size": learner.strategy.world_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this many steps")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--load", default=None, help="resume from this checkpoint, then run --steps steps")
    parser.add_argument("--save-pretrained", default=None, help="save the final model here (from_pretrained)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--micro-batch-tokens", type=int, default=0)
    parser.add_argument("--share-prompts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = train(args.strategy, zero_stage=args.zero_stage, offload=args.offload, steps=args.steps,
                   save_at=args.save_at, ckpt=args.ckpt, load=args.load, save_pretrained=args.save_pretrained,
                   device=args.device, micro_batch_tokens=args.micro_batch_tokens, share_prompts=args.share_prompts)
    if result.pop("is_main"):
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
