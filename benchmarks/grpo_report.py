"""Merge the winnow, winnow+vLLM and TRL results into one JSON and a short markdown table.

    python benchmarks/grpo_report.py winnow.json trl.json --vllm vllm.json [--shapes gen_*.json] \
        --json grpo_benchmark.json --md grpo_benchmark.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpo_common as common

PHASES = ("generate", "score", "advantages", "logprobs", "train", "sync", "end_to_end")


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, digits=3):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def vllm_summary(v: dict) -> dict:
    """The vLLM side's own figures: engine start, the sync, sleep, the engine-vs-learner logprob gap."""
    syncs = v.get("sync_detail") or [{}]
    return {"version": v["versions"].get("vllm"), "engine_start_s": v.get("engine_start_s"),
            "in_process": v["vllm"]["in_process"], "features": v["vllm"]["features"],
            "sync_in_loop_s": v["phases_median_s"].get("sync"), "sync_inner_s": v["phases_median_s"].get(
                "weight_sync_inner"), "sync_transport": syncs[-1].get("transport"),
            "sync_buckets": syncs[-1].get("num_buckets"), "sync_bytes": syncs[-1].get("bytes"),
            "sleep_freed_gib": v.get("sleep_freed_gib"), "gpu_used_gib_device_wide": v.get("gpu_used_gib_device_wide"),
            "logprob_gap": v.get("logprob_gap"), "sync_variants": v.get("vllm_sync")}


def vllm_lines(s: dict) -> list[str]:
    gap = s["logprob_gap"] or {}
    freed = s["sleep_freed_gib"] or []
    out = [f"vLLM {s['version']} side: engine start {s['engine_start_s']:.1f} s (engine core "
           f"{'in this process' if s['in_process'] else 'in its own process'}); sync inside the loop "
           f"{fmt(s['sync_inner_s'])} s median ({s['sync_transport']}, {s['sync_buckets']} buckets, "
           f"{(s['sync_bytes'] or 0) / 2**30:.2f} GiB of fp32 learner weights; the `sync` phase also wakes vLLM); "
           f"sleep level 1 freed {', '.join(f'{x:.1f}' for x in freed)} GiB per iteration; engine-vs-learner "
           f"logprob gap after the syncs (bf16 engine, fp32 learner under bf16 autocast, {gap.get('tokens')} tokens): "
           f"mean {gap.get('mean', 0):.2e}, p99 {gap.get('p99', 0):.2e}, max {gap.get('max', 0):.2e}."]
    variants = s["sync_variants"] or {}
    if variants:
        out += ["", "| vLLM sync, measured alone | median s | gap mean | gap max |", "|---|---:|---:|---:|"]
        for name in ("layerwise", "direct"):
            if name in variants:
                x = variants[name]
                out.append(f"| {name} ({x.get('transport')}, {x.get('num_buckets')} buckets) | {fmt(x['median_s'])} | "
                           f"{x['logprob_gap']['mean']:.2e} | {x['logprob_gap']['max']:.2e} |")
        out += ["", "| vLLM sleep | freed GiB | sleep s | wake s | gap mean after wake + sync |",
                "|---|---:|---:|---:|---:|"]
        for level in (1, 2):
            if (x := variants.get(f"sleep_level_{level}")) is not None:
                out.append(f"| level {level} | {x['freed_gib']:.1f} | {x['sleep_s']:.2f} | {x['wake_s']:.2f} | "
                           f"{x['logprob_gap']['mean']:.2e} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("winnow")
    parser.add_argument("trl", nargs="?")
    parser.add_argument("--vllm", help="the vLLM side (grpo_iteration.py --engine vllm)")
    parser.add_argument("--shapes", nargs="*", default=[], help="generate_shapes.py results")
    parser.add_argument("--json", default="grpo_benchmark.json")
    parser.add_argument("--md", default="grpo_benchmark.md")
    args = parser.parse_args()
    w = json.loads(Path(args.winnow).read_text())
    t = json.loads(Path(args.trl).read_text()) if args.trl and Path(args.trl).exists() else None
    v = json.loads(Path(args.vllm).read_text()) if args.vllm and Path(args.vllm).exists() else None
    shapes = [json.loads(Path(f).read_text()) for f in args.shapes if Path(f).exists()]
    summary = build_summary(w, v, t, shapes)
    Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    lines = markdown(summary, w, v, t, shapes)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def phase_rows(w: dict, v: dict | None, t: dict | None) -> dict:
    """Per phase: each side's median seconds, the floor, and the ratios between them."""
    floors = w["floors"]
    rows = {}
    for phase in PHASES:
        ws = w["phases_median_s"].get(phase)
        ts = t["phases_median_s"].get(phase) if t else None
        vs = v["phases_median_s"].get(phase) if v else None
        fs = common.iteration_floor(floors) if phase == "end_to_end" else floors.get(f"{phase}_s")
        rows[phase] = {"winnow_s": ws, "vllm_s": vs, "trl_s": ts, "winnow_over_trl": ratio(ws, ts),
                       "vllm_over_trl": ratio(vs, ts), "floor_s": fs, "winnow_over_floor": ratio(ws, fs),
                       "vllm_over_floor": ratio(vs, fs), "trl_over_floor": ratio(ts, fs)}
    return rows


RATES = ("generated_tokens_per_s", "trained_tokens_per_s", "learner_model_tflops", "peak_memory_gib",
         "weight_sync_s", "logprobs_pass_s")


def build_summary(w: dict, v: dict | None, t: dict | None, shapes: list[dict]) -> dict:
    """The merged JSON: versions, workload, floors, the phase table, rates, the vLLM figures, the shapes, and
    each side's raw result."""
    rates = {key: {"winnow": w.get(key), "vllm": v.get(key) if v else None, "trl": t.get(key) if t else None}
             for key in RATES}
    rates["learner_mfu"] = {
        "winnow": w.get("learner_mfu"), "vllm": v.get("learner_mfu") if v else None,
        "trl": (t["learner_model_tflops"] / w["ceilings"]["matmul_tflops"])
        if t and t.get("learner_model_tflops") else None,
    }
    shape_keys = ("engine", "shape", "vllm", "num_params", "start_s", "generate_s", "generate_median_s",
                  "generated_tokens_per_s", "floor_generate_s")
    return {
        "date": w["date"], "device": w["device"],
        "versions": {**w["versions"], **(t["versions"] if t else {}), **(v["versions"] if v else {})},
        "workload": w["workload"], "ceilings": w["ceilings"], "floors": w["floors"], "num_params": w["num_params"],
        "phases": phase_rows(w, v, t), "rates": rates,
        "vllm": vllm_summary(v) if v else None,
        "generate_shapes": [{k: g[k] for k in shape_keys} | {"warmup_s": g.get("warmup_s")} for g in shapes],
        "semantics": semantics(w, v, t),
        "measured_iterations": {"winnow": len(w["phases_per_iteration_s"]),
                                "trl": len(t["phases_per_iteration_s"]) if t else 0},
        "raw": {"winnow": w, "vllm": v, "trl": t},
    }


def semantics(w: dict, v: dict | None, t: dict | None) -> dict:
    """What each side's phases mean, what the sides share, and what differs between them."""
    wl = w["workload"]
    return {"winnow": w["semantics"], "vllm": v["semantics"] if v else None,
            "trl": t["semantics"] if t else None,
            "trl_config": t["config"] if t else None,
            "matched": "same model config and random init (seed 0, fp32 master weights, bf16 autocast "
                       "/ bf16 engine), same tokenizer, prompts and reward; 64 prompts x 8 samples, "
                       "128-token prompts, exactly 512 new tokens (winnow ignore_eos, TRL min_new_tokens), "
                       "temperature 1, no top-k/top-p; one optimizer step over all 512 samples with "
                       f"micro-batch {wl['micro_batch_size']} and activation checkpointing "
                       f"{'on' if wl['gradient_checkpointing'] else 'off'} on both sides; "
                       "no old-logprobs pass "
                       "and no reference model (beta 0) on either side",
            "differs": "generation: winnow's CUDA-graph static decode step (its own grouped-query "
                       "attention over length buckets, exponential-race sampling; compile_decode "
                       f"{wl.get('engine_compile', False)}) on a bf16 copy vs TRL's "
                       "model.generate with the default dynamic cache on the fp32 training weights under "
                       "bf16 autocast; training: winnow computes log-probs with a chunked head (no full "
                       "logits, forward or backward) and compiles its decoder layers (learner.compile "
                       f"{wl.get('learner_compile', False)}); TRL uses its fused lm-head "
                       "kernel, also computes entropies, and runs without torch_compile (its default); "
                       "winnow's loss adds TIS against the engine logprobs (elementwise); optimizer: "
                       "fused AdamW on both sides; sync: winnow copies weights into its engine, TRL "
                       "without vLLM has nothing to sync"}


def markdown(summary: dict, w: dict, v: dict | None, t: dict | None, shapes: list[dict]) -> list[str]:
    """The report's lines: the setup, the phase and rate tables, the spread, the vLLM notes, the shapes, the
    floors' definitions."""
    sides = [(label, key, res) for label, key, res in (("winnow", "winnow", w), ("winnow+vLLM", "vllm", v),
                                                       ("TRL", "trl", t)) if res is not None]
    lines = [f"# One GRPO iteration: {' vs '.join(label for label, _, _ in sides)} — {w['device']}, {w['date']}",
             "", setup_paragraph(summary, w, sides), ""]
    lines += table_lines(summary, sides)
    if v is not None:
        lines += ["", *vllm_lines(summary["vllm"])]
    if shapes:
        lines += shape_lines(shapes)
    lines += ["", floors_paragraph(w["floors"])]
    return lines


def setup_paragraph(summary: dict, w: dict, sides: list) -> str:
    wl = w["workload"]
    model = (f"Random-init Qwen2.5-0.5B shape ({w['num_params'] / 1e6:.0f}M parameters, "
             "`benchmarks/qwen25_05b_config.json`)") if w["num_params"] > 1e8 else (
             f"CPU mode: tiny random Qwen2 ({w['num_params'] / 1e6:.2f}M parameters; a smoke test, not a timing)")
    versions = ", ".join(f"{name} {version}" for name, version in summary["versions"].items())
    return (
        f"{versions}. {model}, {wl['num_prompts']} prompts x {wl['num_samples']} samples, "
        f"{wl['prompt_len']}-token prompts, {wl['new_tokens']} new tokens (fixed length), one optimizer step over "
        f"{wl['num_sequences']} samples, micro-batch {wl['micro_batch_size']}, activation checkpointing "
        f"{'on' if wl['gradient_checkpointing'] else 'off'}; winnow compiles its decode glue "
        f"({wl.get('engine_compile', False)}) and learner layers ({wl.get('learner_compile', False)}), TRL runs its "
        "defaults (no torch_compile). winnow+vLLM is winnow's same loop and learner with `--engine-backend vllm` "
        "(vLLM's engine core in its own process, bf16, sleep level 1 while the learner trains, sync by CUDA IPC). "
        "Median of " + ", ".join(f"{len(res['phases_per_iteration_s'])} ({label})" for label, _, res in sides)
        + " iterations after one warm-up. "
        f"Measured ceilings: {w['ceilings']['matmul']} matmul {w['ceilings']['matmul_tflops']:.1f} TFLOP/s, copy "
        f"{w['ceilings']['bandwidth_gbps'] / 1e3:.2f} TB/s. "
        "Reproduce: `bash benchmarks/run_gpu_benchmark.sh` on one GPU (trl 1.16.0 and datasets as wheels in `.whl/`, "
        "vLLM importable for the third side: see `benchmarks/NOTES.md`); `CPU=1` runs the same on a tiny model.")


def table_lines(summary: dict, sides: list) -> list[str]:
    """The phase table with floors, the rate table, and each side's spread over its iterations."""
    lines = ["| phase | " + " | ".join(f"{label} s" for label, _, _ in sides) + " | floor s | "
             + " | ".join(f"{label}/floor" for label, _, _ in sides) + " |",
             "|---|" + "---:|" * (2 * len(sides) + 1)]
    for phase, r in summary["phases"].items():
        lines.append(f"| {phase} | " + " | ".join(fmt(r[f"{key}_s"]) for _, key, _ in sides)
                     + f" | {fmt(r['floor_s'])} | "
                     + " | ".join(fmt(r[f"{key}_over_floor"], 1) for _, key, _ in sides) + " |")
    lines += ["", "| rate | " + " | ".join(label for label, _, _ in sides) + " |", "|---|" + "---:|" * len(sides)]
    r = summary["rates"]
    for name, digits in (("generated_tokens_per_s", 0), ("trained_tokens_per_s", 0), ("learner_model_tflops", 1),
                         ("learner_mfu", 3), ("peak_memory_gib", 1), ("weight_sync_s", 4), ("logprobs_pass_s", 3)):
        lines.append(f"| {name} | " + " | ".join(fmt(r[name][key], digits) for _, key, _ in sides) + " |")
    spread = []
    for label, _, res in sides:
        if res["phases_per_iteration_s"]:
            for phase in ("generate", "end_to_end"):
                values = [row[phase] for row in res["phases_per_iteration_s"]]
                spread.append(f"{label} {phase} {min(values):.2f}-{max(values):.2f} s")
    return lines + ["", "Spread over the measured iterations (min-max): " + "; ".join(spread) + "."]


def shape_lines(shapes: list[dict]) -> list[str]:
    lines = ["", "Generation alone at larger shapes (`benchmarks/generate_shapes.py`: the same rollout, 64 x 8 "
             "samples, 128 + 512 tokens, through winnow's `Engine.generate`; median of the timed calls after a "
             "warm-up call; start = engine construction, which for vLLM includes torch.compile and CUDA graph "
             "capture, while winnow's engine compiles and captures in its warm-up call):", "",
             "| shape | engine | parameters | start s | warm-up call s | generate s | tokens/s | floor s | /floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in sorted(shapes, key=lambda g: (g["num_params"], g["engine"])):
        label = "vLLM " + g["vllm"] if g["vllm"] else "winnow"
        lines.append(f"| {g['shape']} | {label} | {g['num_params'] / 1e9:.2f}B | {g['start_s']:.1f} | "
                     f"{fmt(g.get('warmup_s'), 1)} | "
                     f"{g['generate_median_s']:.2f} | {g['generated_tokens_per_s']:,.0f} | "
                     f"{g['floor_generate_s']:.2f} | {g['generate_median_s'] / g['floor_generate_s']:.1f} |")
    return lines


def floors_paragraph(floors: dict) -> str:
    return (
        f"Floors: generate = per decode step max(bf16 weights + KV cache read / bandwidth, FLOPs / peak), summed "
        f"(bound: {floors['generate_bound']}); train = 6·N·(prompt+response tokens) / peak; sync = fp32 read + bf16 "
        "write / bandwidth; score and logprobs have none (score is host work; neither framework runs an old-logprobs "
        "pass at one step per iteration — `logprobs_pass_s` is what that pass costs when it is needed). "
        "advantages for TRL is the rest of `_generate_and_score_completions` (padding, advantages, metrics). "
        "peak_memory_gib is the driving process's own (vLLM's engine core is another process: see the vLLM notes). "
        "Phase definitions and what differs between the sides: `semantics` in `grpo_benchmark.json`.")


if __name__ == "__main__":
    main()
