"""Time to first iteration: `winnow train grpo` from launch to the end of its first iteration, and what each part
costs (imports, loading and building, the first generate's compile and graph capture, the first train step's
compile), at the Qwen2.5-1.5B shape on one GPU.

    PYTHONPATH=$PWD python benchmarks/first_iteration.py --out benchmarks/results/first_iteration   # GPU, ~2 min
    PYTHONPATH=$PWD python benchmarks/first_iteration.py --cpu --out /tmp/first_iteration            # CPU dry run

The run is the real CLI on the GRPO benchmark's workload (`ray_scaling.py`'s local case: a random-init policy
saved as a checkpoint, 64 prompts x 8 samples, 128-token prompts, 512 new tokens, the parity reward, micro-batch
32, compiled decode glue and compiled learner layers), 2 iterations. The script watches the run's
metrics.jsonl and notes when the first row lands. Parts:

    imports          `import torch, transformers` and winnow's RL recipe in a fresh interpreter (measured apart)
    load and build   launch -> first row, less the imports and the first iteration's phases: config parsing,
                     checkpoint load, the engine's bf16 copy, the learner (optimizer), data and oracle
    first generate   its one-off part: iteration 1's generate - iteration 2's (torch.compile, CUDA graph capture)
    first train      its one-off part: iteration 1's train - iteration 2's (the compiled decoder layers)
    steady iteration iteration 2's phases

Variants (`--variants`, run one after another on the same machine, each a fresh process; a name may repeat,
to alternate two of them):

    fresh        compiled decode glue and learner layers, PyTorch's compile caches empty (TORCHINDUCTOR_CACHE_DIR
                 and TRITON_CACHE_DIR a new folder under OUT), with the run's compile-ahead helpers (the default)
    fresh-alone  the same without them (--no-compile-ahead): the run compiles everything itself
    warm         the same command again with the caches the last fresh launch filled: a user's second launch
    warm-alone   the same without the helpers
    eager        neither compiled (the defaults): no compile at start-up, slower steady iterations

Each variant also records `time/compile` of iterations 1 and 2 (torch.compile's own seconds inside the phases),
how long the run waited for its compile-ahead helpers (the run's log line), and the helpers' own timeline from
their logs (seconds after spawn when each had built its one-layer run, what that took, when each call was done;
the logs are copied to OUT/runs/I_VARIANT_PART.log).

Bytecode (`--bytecode`): `pip install` writes each package's compiled bytecode (`.pyc`) when it installs it, so a
user's first launch reads it. A machine whose installed bytecode is not read (on the GPU machine the run's
imports took 10.5-12.6 s until a bytecode cache was written, then 5.0-5.8 s) would count Python's compiling of
torch's and transformers' sources in every launch. `cache` (the default) does what the install does first:
`compileall` over the packages a run imports, into OUT/pycache (PYTHONPYCACHEPREFIX), which every launch then
reads; `none` leaves the environment as it is.

The run's own "start-up" log line splits loading and building into its parts (load, data and oracle, engine
copy, learner, engine).

Profile (`--profile`): each variant's process runs under cProfile (its times then read high: the profiler slows
Python-heavy tracing), and OUT/runs/VARIANT_profile.txt lists where the main thread spent the launch: the calls
with the most cumulative and own time. Compiling that happens in Inductor's worker processes shows there as the
main thread's wait for it.

Writes OUT/first_iteration.json and OUT/first_iteration.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_common as common  # noqa: E402
from ray_scaling import ROOT, grpo_command, write_policy  # noqa: E402

PHASES = ("generate", "score", "advantages", "train", "sync")


IMPORTED = r"""
import sys, torch, transformers, winnow.recipes.rl, winnow.engines.hf, torch._inductor.compile_fx
import transformers.models.qwen2.modeling_qwen2
from pathlib import Path
roots = set()  # each imported top-level package's folder, or a lone module's file
for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if "." not in name and file:
        roots.add(str(Path(file).parent if Path(file).name == "__init__.py" else Path(file)))
print("\n".join(sorted(roots)))
"""


def compile_bytecode(env: dict) -> dict:
    """What `pip install` does to the packages a run imports: their bytecode, written once into the cache
    (PYTHONPYCACHEPREFIX in env). Returns the seconds it took and how many packages."""
    paths = subprocess.run([sys.executable, "-c", IMPORTED], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *paths], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a stray unparsable file is not an error
    seconds = time.perf_counter() - start
    written = sum(1 for _ in Path(env["PYTHONPYCACHEPREFIX"]).rglob("*.pyc"))
    if not written:
        raise SystemExit(f"compileall wrote no bytecode under {env['PYTHONPYCACHEPREFIX']}; run with --bytecode none")
    return {"seconds": seconds, "paths": len(paths), "pyc_files": written}


def time_imports(env: dict) -> float:
    code = ("import time; t = time.perf_counter(); import torch, transformers; import winnow.recipes.rl; "
            "import winnow.engines.hf; print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())


COMPILE_FLAGS = ["--engine.compile-decode", "--learner.compile"]
VARIANTS = {  # name: (flags, compile caches: "new" empty ones, "last" those of the last fresh launch, or "eager")
    "fresh": (COMPILE_FLAGS, "new"),
    "fresh-alone": (COMPILE_FLAGS + ["--no-compile-ahead"], "new"),
    "warm": (COMPILE_FLAGS, "last"),
    "warm-alone": (COMPILE_FLAGS + ["--no-compile-ahead"], "last"),
    "eager": ([], "eager"),
}


def compile_ahead_wait(log_text: str) -> dict[str, float]:
    """The run's "compile ahead: the run waited 3.1 s (engine), 0.4 s (learner) ..." log line, by part."""
    match = re.search(r"compile ahead: the run waited (.*) for its helpers", log_text)
    if match is None:
        return {}
    return {part: float(seconds) for seconds, part in re.findall(r"([\d.]+) s \((\w+)\)", match.group(1))}


def helper_timeline(run_dir: Path) -> dict[str, dict[str, float]]:
    """Each compile-ahead helper's log kept in RUN_DIR/compile_ahead: seconds after the run spawned it when it had
    imported, had built its one-layer run, had finished each call (the kernels helper: when it was done)."""
    timeline = {}
    for log_file in sorted((run_dir / "compile_ahead").glob("*.log")):
        text, marks = log_file.read_text(), {}
        for what, seconds in re.findall(r"helper (imported|built its one-layer run), ([\d.]+) s after", text):
            marks[what.split()[0]] = float(seconds)
        for k, seconds in re.findall(r"\w+ call (\d+) done, ([\d.]+) s after", text):
            marks[f"call {k}"] = float(seconds)
        for seconds in re.findall(r"kernels helper launched .*, ([\d.]+) s after", text):
            marks["done"] = float(seconds)
        built = re.search(r"built its one-layer run, [\d.]+ s after the run spawned it \((.*)\)", text)
        if built:
            marks.update({f"build: {name}": float(seconds)
                          for name, seconds in re.findall(r"([\w ]+?) ([\d.]+) s(?:, |$)", built.group(1))})
        timeline[log_file.stem] = marks
    return timeline


def startup_parts(log_text: str) -> dict[str, float]:
    """The parts of the run's "start-up 12.3 s: load 4.1 s, engine copy 0.2 s, ..." log line."""
    match = re.search(r"start-up [\d.]+ s: (.*)", log_text)
    if match is None:
        return {}
    parts = (part.rsplit(" ", 2) for part in match.group(1).strip().split(", "))  # "data and oracle", "0.3", "s"
    return {name: float(seconds) for name, seconds, _ in parts}


def launch(command: list[str], env: dict, out: Path, name: str, timeout: float) -> tuple[float, list[dict], str]:
    """Run the CLI once; seconds from launch until iteration 1's metrics row lands, the rows, and the log."""
    metrics = out / "runs" / "first" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    shutil.rmtree(out / "runs" / "first" / "compile_ahead", ignore_errors=True)  # the last launch's helpers' logs
    log_path = out / "runs" / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        first_row_s = None  # when iteration 1's row lands (the row of step 0 comes before the loop starts)
        while process.poll() is None and time.perf_counter() - start < timeout:
            if first_row_s is None and metrics.exists() and any(
                    json.loads(line).get("step", 0) >= 1 for line in metrics.read_text().splitlines() if line.strip()):
                first_row_s = time.perf_counter() - start
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    if process.returncode != 0 or first_row_s is None:
        raise SystemExit(f"the {name} run failed (exit {process.returncode}):\n" + text[-3000:])
    return first_row_s, [json.loads(line) for line in metrics.read_text().splitlines()], text


def write_profile(stats_path: Path, text_path: Path, top: int = 70) -> None:
    """The calls with the most cumulative time, then the most own time, from a cProfile dump."""
    buffer = io.StringIO()
    stats = pstats.Stats(str(stats_path), stream=buffer).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    stats.print_callers(r"\(compile\)|\(visit\)|waitpid|\(bench\)|_register_to_dispatcher")  # who builds kernels
    text_path.write_text(buffer.getvalue())


def measure(name: str, first_row_s: float, rows: list[dict], log_text: str, imports_s: float, run_dir: Path) -> dict:
    first, second = (next(r for r in rows if r.get("step") == step) for step in (1, 2))
    phases = lambda row: {p: row.get(f"time/{p}", 0.0) for p in PHASES}  # noqa: E731
    one, two = phases(first), phases(second)
    return {
        "variant": name, "time_to_first_iteration_s": first_row_s,
        "parts_s": {
            "imports": imports_s,
            "load_and_build": first_row_s - imports_s - sum(one.values()),
            "first_generate_one_off": one["generate"] - two["generate"],
            "first_train_one_off": one["train"] - two["train"],
            "steady_iteration": sum(two.values()),
        },
        "startup_log_s": startup_parts(log_text),
        "compile_ahead_wait_s": compile_ahead_wait(log_text),
        "compile_ahead_helpers_s": helper_timeline(run_dir),
        "compile_s": {"iteration_1": first.get("time/compile", 0.0), "iteration_2": second.get("time/compile", 0.0)},
        "first_iteration_phases_s": one, "second_iteration_phases_s": two,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a directory: first_iteration.{json,md}, the runs and their logs")
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU (a dry run)")
    parser.add_argument("--variants", nargs="+", default=["fresh", "warm", "eager"], choices=list(VARIANTS),
                        help="launches in this order (a name may repeat: each fresh launch gets empty caches)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per launch")
    parser.add_argument("--profile", action="store_true", help="run each launch under cProfile (see above)")
    parser.add_argument("--bytecode", choices=("cache", "none"), default="cache",
                        help="cache: compile the imported packages' bytecode first, as pip install does (see above)")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    policy, data = write_policy(out, args.cpu, workload, 2)
    base_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    bytecode = None
    if args.bytecode == "cache":
        base_env.pop("PYTHONDONTWRITEBYTECODE", None)
        base_env["PYTHONPYCACHEPREFIX"] = str(out / "pycache")
        bytecode = compile_bytecode(base_env)
        print(f"bytecode of {bytecode['paths']} packages compiled in {bytecode['seconds']:.1f} s", flush=True)
    imports_s = time_imports(base_env)
    base = grpo_command(policy, data, out, workload, 2, "first", args.cpu) + ["--learner.no-gradient-checkpointing"]
    results, last_fresh = [], None
    for i, name in enumerate(args.variants):
        flags, caches = VARIANTS[name]
        if caches == "new":
            cache = last_fresh = out / f"compile_cache_{i}"
        elif caches == "last":
            if last_fresh is None:
                raise SystemExit(f"--variants: {name} reuses the caches of a fresh launch before it")
            cache = last_fresh
        else:
            cache = out / "compile_cache_eager"
        env = {**base_env, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
        command = base + ([] if args.cpu else flags)
        stats_path = out / "runs" / f"{name}.prof"
        profiled = [command[0], "-m", "cProfile", "-o", str(stats_path), *command[1:]] if args.profile else command
        first_row_s, rows, text = launch(profiled, env, out, name, args.timeout)
        if args.profile:
            write_profile(stats_path, out / "runs" / f"{name}_profile.txt")
        run_dir = out / "runs" / "first"
        results.append({**measure(name, first_row_s, rows, text, imports_s, run_dir), "command": command[3:]})
        for log_file in (run_dir / "compile_ahead").glob("*.log"):
            shutil.copy(log_file, out / "runs" / f"{i}_{name}_{log_file.name}")
        print(f"{name}: {first_row_s:.1f} s; compile-ahead wait {results[-1]['compile_ahead_wait_s']}", flush=True)
    result = {
        **common.environment(torch.device("cpu" if args.cpu else "cuda")),
        "shape": "tiny" if args.cpu else "1.5b", "workload": common.workload_dict(workload),
        "variants": results, "target_s": 30.0, "bytecode": {"mode": args.bytecode, **(bytecode or {})},
        "profiled": args.profile,
    }
    (out / "first_iteration.json").write_text(json.dumps(result, indent=2))
    names = [r["variant"] for r in results]
    lines = [f"# Time to first iteration: `winnow train grpo`, {result['shape']} shape, {result['device']}", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             "| **launch to the end of iteration 1** | " + " | ".join(
                 f"**{r['time_to_first_iteration_s']:.1f}**" for r in results) + " |"]
    for part in results[0]["parts_s"]:
        lines.append(f"| {part.replace('_', ' ')} | " + " | ".join(f"{r['parts_s'][part]:.1f}" for r in results) + " |")
    for part in ("iteration_1", "iteration_2"):
        lines.append(f"| torch.compile in {part.replace('_', ' ')} | " + " | ".join(
            f"{r['compile_s'][part]:.1f}" for r in results) + " |")
    for part in ("engine", "learner"):
        lines.append(f"| waited for the {part}'s compile-ahead helper | " + " | ".join(
            f"{r['compile_ahead_wait_s'][part]:.1f}" if part in r["compile_ahead_wait_s"] else "-" for r in results)
            + " |")
    for helper in sorted({name for r in results for name in r["compile_ahead_helpers_s"]}):
        for mark in ("built", "call 1", "call 2", "done"):
            if any(mark in r["compile_ahead_helpers_s"].get(helper, {}) for r in results):
                lines.append(f"| {helper} helper: {mark}, s after spawn | " + " | ".join(
                    f"{r['compile_ahead_helpers_s'][helper][mark]:.1f}"
                    if mark in r["compile_ahead_helpers_s"].get(helper, {}) else "-" for r in results) + " |")
    for part in results[0]["startup_log_s"]:
        lines.append(f"| start-up: {part} | " + " | ".join(
            f"{r['startup_log_s'].get(part, float('nan')):.1f}" for r in results) + " |")
    (out / "first_iteration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
