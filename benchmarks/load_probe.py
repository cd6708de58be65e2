"""Where loading the policy goes at start-up (issue 15, time to first iteration): `from_pretrained` of a
random-init checkpoint at the Qwen2.5-1.5B shape, stored in float32 and in bfloat16 (hub checkpoints are bf16),
each loaded as the learner's float32 model on the host or straight onto the GPU, in a fresh process per case.

    PYTHONPATH=$PWD python benchmarks/load_probe.py --out load_probe.json            # GPU
    PYTHONPATH=$PWD python benchmarks/load_probe.py --cpu --out /tmp/load_probe.json  # tiny model, a dry run

Each case's process times `import torch`, `import transformers`, the modules `from_pretrained` imports on its
first call (the model's code, torch's compiler and DTensor), CUDA's first touch (one allocation), the load, and
for a host load the move to the GPU; the slowest functions of one host load are
listed (cProfile, cumulative seconds), to say whether the bytes or the Python around them cost.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASE = r"""
import cProfile, json, pstats, sys, time
t = time.perf_counter(); import torch; imports_torch = time.perf_counter() - t
t = time.perf_counter(); import transformers; from transformers import AutoModelForCausalLM
imports_transformers = time.perf_counter() - t
t = time.perf_counter()  # what from_pretrained imports on its first call (model code, dynamo, DTensor)
import torch._dynamo, torch.distributed.tensor, transformers.modeling_utils, transformers.masking_utils
import transformers.models.qwen2.modeling_qwen2
imports_model_code = time.perf_counter() - t
path, target, profile = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
row = {"import_torch_s": imports_torch, "import_transformers_s": imports_transformers,
       "import_model_code_s": imports_model_code}
if torch.cuda.is_available():
    t = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
    row["cuda_init_s"] = time.perf_counter() - t
kwargs = {"dtype": torch.float32} | ({"device_map": target} if target != "cpu" else {})
profiler = cProfile.Profile() if profile else None
t = time.perf_counter()
if profiler: profiler.enable()
model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
if profiler: profiler.disable()
if torch.cuda.is_available(): torch.cuda.synchronize()
row["from_pretrained_s"] = time.perf_counter() - t
if target == "cpu" and torch.cuda.is_available():
    t = time.perf_counter(); model.to("cuda"); torch.cuda.synchronize(); row["to_gpu_s"] = time.perf_counter() - t
row["device"] = str(next(model.parameters()).device)
row["dtype"] = str(next(model.parameters()).dtype)
if profiler:
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    row["slowest"] = [{"s": round(v[3], 3), "calls": v[1], "where": f"{k[0].split('site-packages/')[-1]}:{k[1]}:{k[2]}"}
                      for k, v in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:25]]
print("ROW " + json.dumps(row))
"""


def write_checkpoints(out: Path, cpu: bool) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    import grpo_common as common
    from generate_shapes import qwen_config

    config = common.model_config(True) if cpu else qwen_config("1.5b")
    paths = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        path = out / f"policy_{name}"
        if not (path / "config.json").exists():
            torch.manual_seed(common.SEED)
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--work", default="/tmp/load_probe", help="where the checkpoints are written")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = write_checkpoints(work, args.cpu)
    targets = ["cpu"] if args.cpu else ["cpu", "cuda"]
    rows = []
    for stored in ("fp32", "bf16"):
        for target in targets:
            profile = "1" if target == "cpu" else "0"
            done = subprocess.run([sys.executable, "-c", CASE, str(paths[stored]), target, profile],
                                  capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("ROW ")), None)
            if line is None:
                raise SystemExit(f"case {stored} -> {target} failed:\n{done.stderr[-3000:]}")
            row = {"stored": stored, "target": target, **json.loads(line[4:])}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "slowest"}))
    import torch
    import transformers

    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "checkpoint_bytes": {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in paths.items()},
              "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
