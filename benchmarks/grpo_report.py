"""Merge the winnow and TRL results into one JSON and a short markdown table.

    python benchmarks/grpo_report.py winnow.json trl.json --json grpo_benchmark.json --md grpo_benchmark.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PHASES = ("generate", "score", "advantages", "logprobs", "train", "sync", "end_to_end")


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, digits=3):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("winnow")
    parser.add_argument("trl", nargs="?")
    parser.add_argument("--json", default="grpo_benchmark.json")
    parser.add_argument("--md", default="grpo_benchmark.md")
    args = parser.parse_args()
    w = json.loads(Path(args.winnow).read_text())
    t = json.loads(Path(args.trl).read_text()) if args.trl and Path(args.trl).exists() else None
    floors = w["floors"]
    floor_e2e = sum(floors[f"{p}_s"] for p in ("generate", "score", "logprobs", "train", "sync"))
    rows = {}
    for phase in PHASES:
        ws = w["phases_median_s"].get(phase)
        ts = t["phases_median_s"].get(phase) if t else None
        fs = floor_e2e if phase == "end_to_end" else floors.get(f"{phase}_s")
        rows[phase] = {"winnow_s": ws, "trl_s": ts, "winnow_over_trl": ratio(ws, ts), "floor_s": fs,
                       "winnow_over_floor": ratio(ws, fs), "trl_over_floor": ratio(ts, fs)}
    summary = {
        "date": w["date"], "device": w["device"], "versions": {**w["versions"], **(t["versions"] if t else {})},
        "workload": w["workload"], "ceilings": w["ceilings"], "floors": floors, "num_params": w["num_params"],
        "phases": rows,
        "rates": {
            name: {"winnow": w.get(key), "trl": t.get(key) if t else None}
            for name, key in (("generated_tokens_per_s", "generated_tokens_per_s"),
                              ("trained_tokens_per_s", "trained_tokens_per_s"),
                              ("learner_model_tflops", "learner_model_tflops"),
                              ("peak_memory_gib", "peak_memory_gib"), ("weight_sync_s", "weight_sync_s"),
                              ("logprobs_pass_s", "logprobs_pass_s"))
        },
        "semantics": {"winnow": w["semantics"], "trl": t["semantics"] if t else None,
                      "trl_config": t["config"] if t else None,
                      "matched": "same model config and random init (seed 0, fp32 master weights, bf16 autocast "
                                 "/ bf16 engine), same tokenizer, prompts and reward; 64 prompts x 8 samples, "
                                 "128-token prompts, exactly 512 new tokens (winnow ignore_eos, TRL min_new_tokens), "
                                 "temperature 1, no top-k/top-p; one optimizer step over all 512 samples with "
                                 f"micro-batch {w['workload']['micro_batch_size']} and activation checkpointing "
                                 f"{'on' if w['workload']['gradient_checkpointing'] else 'off'} on both sides; "
                                 "no old-logprobs pass "
                                 "and no reference model (beta 0) on either side",
                      "differs": "generation: winnow's CUDA-graph static decode step (its own grouped-query "
                                 "attention over length buckets, exponential-race sampling; compile_decode "
                                 f"{w['workload'].get('engine_compile', False)}) on a bf16 copy vs TRL's "
                                 "model.generate with the default dynamic cache on the fp32 training weights under "
                                 "bf16 autocast; training: winnow computes log-probs with a chunked head (no full "
                                 "logits, forward or backward) and compiles its decoder layers (learner.compile "
                                 f"{w['workload'].get('learner_compile', False)}); TRL uses its fused lm-head "
                                 "kernel, also computes entropies, and runs without torch_compile (its default); "
                                 "winnow's loss adds TIS against the engine logprobs (elementwise); optimizer: "
                                 "fused AdamW on both sides; sync: winnow copies weights into its engine, TRL "
                                 "without vLLM has nothing to sync"},
        "measured_iterations": {"winnow": len(w["phases_per_iteration_s"]),
                                "trl": len(t["phases_per_iteration_s"]) if t else 0},
    }
    summary["rates"]["learner_mfu"] = {
        "winnow": w.get("learner_mfu"),
        "trl": (t["learner_model_tflops"] / w["ceilings"]["matmul_tflops"])
        if t and t.get("learner_model_tflops") else None,
    }
    summary["raw"] = {"winnow": w, "trl": t}
    Path(args.json).write_text(json.dumps(summary, indent=2, default=str))

    wl = w["workload"]
    model = (f"Random-init Qwen2.5-0.5B shape ({w['num_params'] / 1e6:.0f}M parameters, "
             "`benchmarks/qwen25_05b_config.json`)") if w["num_params"] > 1e8 else (
             f"CPU mode: tiny random Qwen2 ({w['num_params'] / 1e6:.2f}M parameters; a smoke test, not a timing)")
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    lines = [
        f"# One GRPO iteration: winnow vs TRL — {w['device']}, {w['date']}",
        "",
        f"{versions}. {model}, {wl['num_prompts']} prompts x {wl['num_samples']} samples, "
        f"{wl['prompt_len']}-token prompts, {wl['new_tokens']} new tokens (fixed length), one optimizer step over "
        f"{wl['num_sequences']} samples, micro-batch {wl['micro_batch_size']}, activation checkpointing "
        f"{'on' if wl['gradient_checkpointing'] else 'off'}; winnow compiles its decode glue "
        f"({wl.get('engine_compile', False)}) and learner layers ({wl.get('learner_compile', False)}), TRL runs its "
        "defaults (no torch_compile). "
        f"Median of {summary['measured_iterations']['winnow']} (winnow) and "
        f"{summary['measured_iterations']['trl']} (TRL) iterations after one warm-up. "
        f"Measured ceilings: {w['ceilings']['matmul']} matmul {w['ceilings']['matmul_tflops']:.1f} TFLOP/s, copy "
        f"{w['ceilings']['bandwidth_gbps'] / 1e3:.2f} TB/s. "
        "Reproduce: `bash benchmarks/run_gpu_benchmark.sh` on one GPU (trl 1.16.0 and datasets as wheels in `.whl/`: "
        "see `benchmarks/NOTES.md`); `CPU=1` runs the same on a tiny model in seconds.",
        "",
        "| phase | winnow s | TRL s | winnow/TRL | floor s | winnow/floor | TRL/floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, r in rows.items():
        lines.append(f"| {phase} | {fmt(r['winnow_s'])} | {fmt(r['trl_s'])} | {fmt(r['winnow_over_trl'], 2)} | "
                     f"{fmt(r['floor_s'])} | {fmt(r['winnow_over_floor'], 1)} | {fmt(r['trl_over_floor'], 1)} |")
    lines += ["", "| rate | winnow | TRL |", "|---|---:|---:|"]
    r = summary["rates"]
    for name, digits in (("generated_tokens_per_s", 0), ("trained_tokens_per_s", 0), ("learner_model_tflops", 1),
                         ("learner_mfu", 3), ("peak_memory_gib", 1), ("weight_sync_s", 4), ("logprobs_pass_s", 3)):
        lines.append(f"| {name} | {fmt(r[name]['winnow'], digits)} | {fmt(r[name]['trl'], digits)} |")
    spread = []
    for name, res in (("winnow", w), ("TRL", t)):
        if res and res["phases_per_iteration_s"]:
            for phase in ("generate", "end_to_end"):
                values = [row[phase] for row in res["phases_per_iteration_s"]]
                spread.append(f"{name} {phase} {min(values):.2f}-{max(values):.2f} s")
    lines += ["", "Spread over the measured iterations (min-max): " + "; ".join(spread) + "."]
    lines += [
        "",
        f"Floors: generate = per decode step max(bf16 weights + KV cache read / bandwidth, FLOPs / peak), summed "
        f"(bound: {floors['generate_bound']}); train = 6·N·(prompt+response tokens) / peak; sync = fp32 read + bf16 "
        "write / bandwidth; score and logprobs have none (score is host work; neither framework runs an old-logprobs "
        "pass at one step per iteration — `logprobs_pass_s` is what that pass costs when it is needed). "
        "advantages for TRL is the rest of `_generate_and_score_completions` (padding, advantages, metrics). "
        "Phase definitions and what differs between the two sides: `semantics` in `grpo_benchmark.json`.",
    ]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
