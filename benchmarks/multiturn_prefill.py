"""What the engine reuses between the turns of an episode, and what reuse would save.

    python benchmarks/multiturn_prefill.py OUT_DIR [--cpu] [--turns 8] [--batch 16] [--obs-tokens 64]
        [--action-tokens 32] [--first-tokens 256]

Each turn of an episode hands the engine the whole conversation so far (`winnow/loops/episodes.py`). The embedded
`hf` engine keeps no KV cache between `generate` calls, so every turn prefills the whole conversation again; this
script measures that against the floor, a decode that keeps the KV cache across turns (transformers'
`DynamicCache`) and prefills only each turn's new observation tokens. Same model, same greedy tokens: turn t of
both paths is checked to produce identical actions. vLLM's prefix caching (on by default in winnow's vllm engine)
is the production form of the floor: a turn's earlier blocks are found in its cache.

Writes OUT_DIR/multiturn_prefill.json and OUT_DIR/multiturn_prefill.md (per turn: conversation length, tokens
prefilled by the engine and by the floor, seconds of each). `--cpu` runs the tiny model of the tests (a dry run);
without it, a random-weight Qwen2.5-0.5B-shaped model (benchmarks/qwen25_05b_config.json) in bf16 on the GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config

from winnow.engines.hf import HFEngine
from winnow.types import SamplingParams

HERE = Path(__file__).resolve().parent


class _IdTokenizer:
    """What the engine asks of a tokenizer when prompts are ids and there are no stop strings."""

    def __init__(self, eos_token_id: int, pad_token_id: int):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def build_model(is_cpu: bool) -> torch.nn.Module:
    if is_cpu:
        config = Qwen2Config(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                             tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    config = Qwen2Config(**{k: v for k, v in json.loads((HERE / "qwen25_05b_config.json").read_text()).items()
                            if k not in ("architectures", "torch_dtype", "model_type")})
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def cached_turn(model, cache: DynamicCache, new_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Prefill `new_ids` [B, n] onto `cache`, then decode `num_tokens` greedy tokens; returns them [B, A]. The cache
    keeps everything, the decoded tokens included (they are the next turn's context)."""
    logits = model(input_ids=new_ids, past_key_values=cache, use_cache=True).logits[:, -1]
    out = []
    for _ in range(num_tokens):
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    # the last decoded token went through the model above: the cache now holds it
    return torch.cat(out, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU model (a dry run)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--first-tokens", type=int, default=256, help="the first observation's tokens")
    parser.add_argument("--obs-tokens", type=int, default=64, help="each later observation's tokens")
    parser.add_argument("--action-tokens", type=int, default=32, help="tokens generated per turn")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.cpu)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    engine = HFEngine(model, _IdTokenizer(1, 0), device=device, copy_model=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.action_tokens, ignore_eos=True)
    observations = [torch.randint(3, vocab, (args.batch, args.first_tokens if t == 0 else args.obs_tokens))
                    for t in range(args.turns)]
    run_episode(engine, model, observations, params, args.action_tokens)  # warm-up: compiles, graphs, allocator
    write(args, run_episode(engine, model, observations, params, args.action_tokens))


def run_episode(engine: HFEngine, model, observations: list[torch.Tensor], params: SamplingParams,
                action_tokens: int) -> list[dict]:
    """One batch of episodes, turn by turn, through the engine and through the KV-reusing floor."""
    device = engine.device
    batch = observations[0].shape[0]
    conversations = [[] for _ in range(batch)]
    cache = DynamicCache()
    rows = []
    for t, obs in enumerate(observations):
        for row, ids in zip(conversations, obs.tolist()):
            row += ids
        sync(device)
        start = time.perf_counter()
        completions = engine.generate([list(c) for c in conversations], params)
        sync(device)
        engine_s = time.perf_counter() - start
        start = time.perf_counter()
        actions = cached_turn(model, cache, obs.to(device), action_tokens)
        sync(device)
        floor_s = time.perf_counter() - start
        engine_actions = [c.response_ids for c in completions]
        rows.append({"turn": t + 1, "conversation_tokens": len(conversations[0]),
                     "engine_prefill_tokens": batch * len(conversations[0]),
                     "floor_prefill_tokens": batch * obs.shape[1],
                     "engine_s": engine_s, "floor_s": floor_s,
                     "same_actions": engine_actions == actions.tolist()})
        for row, action in zip(conversations, engine_actions):
            row += action
    return rows


def write(args, rows: list[dict]) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    totals = {key: sum(r[key] for r in rows) for key in
              ("engine_prefill_tokens", "floor_prefill_tokens", "engine_s", "floor_s")}
    result = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(), "args": vars(args), "turns": rows,
              "totals": totals, "all_actions_equal": all(r["same_actions"] for r in rows)}
    (out / "multiturn_prefill.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Multi-turn prefill: the hf engine vs the KV-reusing floor ({result['device']}, batch {args.batch}, "
             f"{args.action_tokens} tokens per action)", "",
             "| turn | conversation tokens | prefilled: engine | prefilled: floor | engine s | floor s | same actions |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['turn']} | {r['conversation_tokens']} | {r['engine_prefill_tokens']} | {r['floor_prefill_tokens']} "
              f"| {r['engine_s']:.3f} | {r['floor_s']:.3f} | {r['same_actions']} |" for r in rows]
    lines += [f"| all | | {totals['engine_prefill_tokens']} | {totals['floor_prefill_tokens']} | "
              f"{totals['engine_s']:.3f} | {totals['floor_s']:.3f} | {result['all_actions_equal']} |"]
    (out / "multiturn_prefill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
