"""What `--sync.check-sync` reads on a random-weight model when the sync is right, by engine dtype (GPU).

    PYTHONPATH=$PWD python benchmarks/sync_precision.py --shapes 1.5b 7b --out benchmarks/results/sync_precision.json

Per shape: a random-init Qwen2.5-shaped policy in float32 (the learner's, single device, bf16 autocast as in
training), the embedded engine built from it in bf16 and in float32, the weights synced, and the check's probe
(4 prompts of 128 random tokens, 16 sampled tokens each, temperature 1) compared: the mean and max |engine -
learner| logprob. A control: a bf16 engine of a differently seeded model, never synced (what a sync that loaded
nothing reads). Writes OUT as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpo_common as common  # noqa: E402
from generate_shapes import qwen_config  # noqa: E402
from winnow.engines.hf import HFEngine, HFEngineConfig  # noqa: E402
from winnow.learner.learner import Learner, LearnerConfig  # noqa: E402
from winnow.learner.sync import sync_weights, verify_sync  # noqa: E402


def random_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure(shape: str) -> dict:
    config = qwen_config(shape)
    tokenizer = common.build_tokenizer(config.vocab_size, config.eos_token_id)
    learner = Learner(random_model(config, 0), LearnerConfig(lr=1e-6), total_steps=1, device="cuda")
    g = torch.Generator().manual_seed(1)
    probe = [torch.randint(0, config.vocab_size - 1, (128,), generator=g).tolist() for _ in range(4)]
    row = {"shape": shape}
    for dtype in ("bfloat16", "float32"):
        engine = HFEngine(learner.model, tokenizer, HFEngineConfig(dtype=dtype), device="cuda", copy_model=True)
        sync_weights(learner, engine)
        row[f"synced_{dtype}"] = verify_sync(engine, learner, probe, tolerance=1e9)
        del engine
        torch.cuda.empty_cache()
    other = random_model(config, 1)
    engine = HFEngine(other, tokenizer, HFEngineConfig(dtype="bfloat16"), device="cuda", copy_model=True)
    del other
    row["never_synced_bfloat16"] = verify_sync(engine, learner, probe, tolerance=1e9)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1.5b", "7b"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        rows.append(measure(shape))
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
