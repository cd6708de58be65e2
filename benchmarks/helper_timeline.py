"""Where a compile-ahead helper's time goes: helpers (`python -m winnow.recipes.compile_ahead FOLDER NAME`) run
without their run on `first_iteration.py`'s workload (1.5B shape, 64 prompts x 8 samples, 128 + 512 tokens, compiled decode
glue and learner layers), with its parts timed from inside the process.

    PYTHONPATH=$PWD python benchmarks/helper_timeline.py --out /tmp/ht                 # GPU, ~2 min
    PYTHONPATH=$PWD python benchmarks/helper_timeline.py --cpu --out /tmp/ht           # CPU dry run (tiny model)

Each case (`--cases`, run one after another; PARTS/CACHES: PARTS one part or several, comma-separated, spawned
together as a run spawns them; CACHES "fresh" for new empty compile caches or "warm" for those the last fresh case
of the same PARTS filled, "+profile" to run it under cProfile) spawns the helpers as the run would, and logs, in
seconds since the spawn: its imports and build (the helper's own log line), each Triton kernel of winnow's own that
it JIT-compiles (name, seconds; Inductor's kernels are built in its worker processes and only loaded here), the
decoder's prefill and each CUDA graph capture, each call of the part with torch.compile's seconds so far. A profiled
case writes the main thread's top calls to OUT/CASE_profile.txt (its times read high).

No run is launched: the policy folder holds the model's config only (the helper builds a one-layer random model from
it), its tokenizer and the prompts. Writes OUT/helper_timeline.json and OUT/helper_timeline.md.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MARK = "TIMELINE"


def _mark(what: str, seconds: float | None = None) -> None:
    """One timeline line: seconds since the run spawned this helper, what happened (and how long it took)."""
    from winnow import compile_ahead

    took = "" if seconds is None else f" ({seconds:.2f} s)"
    print(f"{MARK} {compile_ahead.seconds_since_spawn():7.2f} {what}{took}", flush=True)


def _timed(owner, name: str, label) -> None:
    """Wrap owner.name so each call marks its end and duration; label(args) names it."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _mark(label(args, kwargs), time.perf_counter() - start)

    setattr(owner, name, timed)


def _instrument() -> None:
    """Time, in this helper: the steps of its build, winnow's own Triton kernels' JIT compiles and the C launchers
    Triton builds for them, the decoder's prefill and captures, the learner's calls."""
    from winnow.engines import static_decode
    from winnow.learner import learner as learner_base
    from winnow.recipes import compile_ahead as recipe

    for name in ("setup_process", "resolve_device", "start_compile_workers", "load_tokenizer", "load_splits",
                 "one_layer_policy", "build_parts"):
        _timed(recipe, name, lambda a, k, name=name: name)

    _timed(static_decode.StaticDecoder, "_prefill", lambda a, k: "prefill")
    _timed(static_decode.StaticDecoder, "_capture", lambda a, k: f"capture rows {a[0].active} width {a[1]}")
    for name in ("forward_ahead", "train_policy"):
        if hasattr(learner_base.Learner, name):
            _timed(learner_base.Learner, name, lambda a, k, name=name: f"learner {name}")
    try:
        from triton.runtime import jit
    except ImportError:
        return
    _timed(jit.JITFunction, "_do_compile", lambda a, k: f"triton JIT {a[0].fn.__name__}")
    import importlib

    for module in ("triton.runtime.build", "triton.backends.nvidia.driver"):
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(owner, "compile_module_from_src"):
            _timed(owner, "compile_module_from_src", lambda a, k: f"triton C build {k.get('name', a[1:2])}")


def child(folder: Path, part: str, profile: Path | None) -> int:
    from winnow.recipes import compile_ahead as recipe

    _instrument()
    if profile is None:
        return recipe._main([str(folder), part])
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(recipe._main, [str(folder), part])
    finally:
        profiler.dump_stats(str(profile))


def write_config_only(out: Path, cpu: bool) -> tuple[Path, Path]:
    """The policy folder as `ray_scaling.write_policy` writes it, without the weights (a helper reads the config
    only), with the tokenizer and prompts."""
    import grpo_common as common
    from generate_shapes import qwen_config
    from winnow.data.tiny import save_tokenizer

    config = common.model_config(True) if cpu else qwen_config("1.5b")
    policy, data = out / "policy", out / "prompts.jsonl"
    policy.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(policy)
    save_tokenizer(common.build_tokenizer(config.vocab_size, config.eos_token_id), out / "tokenizer")
    workload = common.CPU_WORKLOAD if cpu else common.GPU_WORKLOAD
    texts = common.prompt_texts(workload, config.vocab_size, config.eos_token_id, 3)
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return policy, data


def run_config(out: Path, cpu: bool):
    """The config `first_iteration.py`'s compiled launch parses."""
    import grpo_common as common
    from ray_scaling import grpo_command
    from winnow.cli import trainers
    from winnow.config import parse

    policy, data = write_config_only(out, cpu)
    workload = common.CPU_WORKLOAD if cpu else common.GPU_WORKLOAD
    argv = grpo_command(policy, data, out, workload, 2, "first", cpu)[5:] + ["--learner.no-gradient-checkpointing",
                                                                           "--engine.compile-decode",
                                                                           "--learner.compile"]
    algo_cls, trainer = trainers()["grpo"]
    config_cls, _ = trainer()
    return parse(config_cls[algo_cls], config_cls(algo=algo_cls()), argv, prog="winnow train grpo")


def run_case(case: str, index: int, config, out: Path, caches: dict[str, Path], base_env: dict,
             timeout: float) -> dict:
    """One case: its helpers (PART, or PART,PART spawned together as a run spawns them) on fresh or warm caches."""
    parts_text, rest = case.split("/")
    parts = parts_text.split(",")
    kind, _, profiled = rest.partition("+")
    if kind == "fresh" or parts_text not in caches:
        caches[parts_text] = out / f"cache_{index}"
    cache = caches[parts_text]
    folder = out / f"case_{index}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.pickle", "wb") as f:
        pickle.dump({"config": config, "device_types": ("cuda", "cpu"), "spawned_at": time.time()}, f)
    env = {**base_env, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    start, processes = time.perf_counter(), {}
    for part in parts:
        profile = out / f"{index}_{part}_{kind}.prof" if profiled else None
        command = [sys.executable, __file__, "--child", str(folder), part,
                   *(["--profile", str(profile)] if profile else [])]
        log = open(out / f"{index}_{part}_{kind}{'_profiled' if profiled else ''}.log", "w+")
        processes[part] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log, profile)
    timelines = {}
    for part, (process, log, profile) in processes.items():
        process.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        log.seek(0)
        text = log.read()
        log.close()
        if process.returncode != 0:
            raise SystemExit(f"case {case}, {part} failed (exit {process.returncode}):\n{text[-3000:]}")
        timeline = [(float(s), what) for s, what in re.findall(rf"^{MARK}\s+([\d.]+) (.*)$", text, re.M)]
        for line in re.findall(r"compile ahead: (.*)$", text, re.M):
            seconds = re.search(r"([\d.]+) s after the run spawned", line)
            if seconds:
                timeline.append((float(seconds.group(1)), line))
        timelines[part] = sorted(timeline)
        if profile:
            import io
            import pstats

            buffer = io.StringIO()
            stats = pstats.Stats(str(profile), stream=buffer).strip_dirs()
            stats.sort_stats("cumulative").print_stats(80)
            stats.sort_stats("tottime").print_stats(40)
            (out / f"{index}_{part}_{kind}_profile.txt").write_text(buffer.getvalue())
    return {"case": case, "wall_s": time.perf_counter() - start, "timelines": timelines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--cases", nargs="+", default=["engine/fresh", "learner/fresh", "engine/warm", "learner/warm"])
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--bytecode", choices=("cache", "none"), default="cache",
                        help="cache: compile the imported packages' bytecode first (first_iteration.py's --bytecode)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(Path(args.child[0]), args.child[1], Path(args.profile) if args.profile else None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = run_config(out, args.cpu)
    base_env = dict(os.environ)
    if args.bytecode == "cache":  # as first_iteration.py: the imported packages' bytecode, as pip install writes it
        from first_iteration import compile_bytecode

        base_env.pop("PYTHONDONTWRITEBYTECODE", None)
        base_env["PYTHONPYCACHEPREFIX"] = str(out / "pycache")
        print(f"bytecode: {compile_bytecode(base_env)}", flush=True)
    caches: dict[str, Path] = {}
    results = []
    for index, case in enumerate(args.cases):
        results.append(run_case(case, index, config, out, caches, base_env, args.timeout))
        print(f"--- {case}: {results[-1]['wall_s']:.1f} s", flush=True)
        for part, timeline in results[-1]["timelines"].items():
            for seconds, what in timeline:
                print(f"{seconds:7.2f}  {part:8s} {what}", flush=True)
    import grpo_common as common
    import torch

    result = {**common.environment(torch.device("cpu" if args.cpu else "cuda")), "cases": results}
    (out / "helper_timeline.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Compile-ahead helpers alone: timeline, s after spawn ({result['device']})", ""]
    for r in results:
        lines += [f"## {r['case']} (wall {r['wall_s']:.1f} s)", "", "| s | helper | what |", "|---:|---|---|"]
        lines += [f"| {seconds:.2f} | {part} | {what.replace('|', '/')} |"
                  for part, timeline in r["timelines"].items() for seconds, what in timeline] + [""]
    (out / "helper_timeline.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
