"""The framework's own host (CPU) work in one GRPO iteration of `grpo_iteration.py`'s workload, without a GPU.

    python benchmarks/host_overhead.py --out host.json                  # the code as it is
    python benchmarks/host_overhead.py --baseline 3d93400 --out host.json   # and the same pieces at a revision

The GPU benchmark's iteration is generate -> score -> advantages -> train -> sync, each a phase of `Loop.step`.
This script times the parts of it that run on the host, on the same shapes (64 prompts x 8 samples, 128-token
prompts, 512 new tokens, `grpo_common.build_tokenizer(151936, 151643)`, the parity reward):

- `completions`: `HFEngine._completions`, the end of generate: the decode batch's tensors (random tokens and
  logprobs standing for what the GPU sampled) to 512 `Completion`s, detokenised;
- `score`: `RLFamily.score` (the `FunctionOracle` over the parity reward, grouping, metrics), and `reward_fn`,
  the parity reward alone (the workload's cost, not the framework's);
- `advantages`: `RLFamily.advantages` (GRPO group advantages and the padded `TrainBatch`), and
  `make_train_batch` alone;
- `step`: a whole `Loop.step` with the engine's host part (`completions`) as the actor and a learner that trains
  nothing: its phases, `outside` (the step's wall time that no phase timed) and the garbage collector's pauses.

With `--baseline REV` the modules these pieces live in (hf.py, batch.py, functions.py, rl.py, base.py) are also
loaded as they were at REV (`git show`), and every measurement alternates between the two in one process, so
a noisy host moves both alike. Medians (and minima) of `--repeats` runs, in milliseconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

import grpo_common as common
from winnow.algorithms import GRPO
from winnow.lazy import LazyModule
from winnow.types import Prompt, SamplingParams

REPO = Path(__file__).resolve().parent.parent
MODULES = {"hf": "winnow/engines/hf.py", "batch": "winnow/learner/batch.py", "functions": "winnow/oracles/functions.py",
           "rl": "winnow/loops/rl.py", "base": "winnow/loops/base.py"}


def current_modules() -> SimpleNamespace:
    from winnow.engines import hf
    from winnow.learner import batch
    from winnow.loops import base, rl
    from winnow.oracles import functions

    return SimpleNamespace(hf=hf, batch=batch, functions=functions, rl=rl, base=base)


def modules_at(revision: str) -> SimpleNamespace:
    """The timed modules as they were at `revision`, each loaded under a name of its own; the RL family of that
    revision builds its batches with that revision's `make_train_batch`."""
    loaded = {}
    for key, path in MODULES.items():
        source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, check=True, capture_output=True,
                                text=True).stdout
        module = types.ModuleType(f"_baseline_{key}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
        for name, value in list(vars(module).items()):  # as winnow's own modules, once torch is in: no stand-ins
            if isinstance(value, LazyModule):
                setattr(module, name, importlib.import_module(value.__name__))
        loaded[key] = module
    loaded["rl"].make_train_batch = loaded["batch"].make_train_batch
    return SimpleNamespace(**loaded)


@dataclasses.dataclass
class DecodeBatch:
    """What the engine's decode loop leaves on the host: tokens, logprobs [B, T], lengths, is_done [B]."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    is_done: torch.Tensor


def make_workload(args) -> tuple[list[Prompt], DecodeBatch]:
    g = torch.Generator().manual_seed(args.seed)
    high = 151643  # below EOS: every id is a word of the tokenizer
    prompts = []
    for i in range(args.num_prompts):
        ids = torch.randint(10, high, (args.prompt_len,), generator=g).tolist()
        prompts.append(Prompt(text=" ".join(f"t{t}" for t in ids), token_ids=ids, index=i))
    shape = (args.num_prompts * args.num_samples, args.new_tokens)
    lengths = torch.full(shape[:1], args.new_tokens)
    if args.ragged:  # responses of 1 .. new_tokens tokens, those shorter than the budget stopped
        lengths = torch.randint(1, args.new_tokens + 1, shape[:1], generator=g)
    decoded = DecodeBatch(torch.randint(10, high, shape, generator=g), -5 * torch.rand(shape, generator=g),
                          lengths, lengths < args.new_tokens)
    return prompts, decoded


class HostActor:
    """The engine's host part as an actor: every generate returns the same decode batch as completions."""

    def __init__(self, engine, completions_fn, decoded: DecodeBatch):
        self.engine, self.completions_fn, self.decoded = engine, completions_fn, decoded

    def generate(self, prompts, params):
        d = self.decoded
        expanded = [ids for ids in prompts for _ in range(params.n)]
        return self.completions_fn(self.engine, expanded, d.tokens, d.logprobs, d.lengths, d.is_done, params)

    def sleep(self):
        pass

    def wake(self):
        pass

    def sync(self, learner, config, probe, seed):
        return {}


class NoLearner:
    num_steps, is_main = 0, True

    def shard(self, batch):
        return batch

    def forward_ahead(self, batch, rows_per_unit=1):
        return None

    def train_policy(self, batch, loss_fn, needs_reference, on_mini_batch=None, ahead=None):
        return {}


class _NoLogger:
    def log(self, row, step=None):
        pass


def build(mods: SimpleNamespace, engine, prompts: list[Prompt], decoded: DecodeBatch, args):
    """The RL family and the loop over it, from `mods`."""
    sampling = SamplingParams(max_tokens=args.new_tokens, n=args.num_samples, ignore_eos=True, stop=args.stop)
    rollout = SimpleNamespace(max_tokens=args.new_tokens, stop=args.stop, drop_uniform_groups=False,
                              sampling_params=lambda seed=None: dataclasses.replace(sampling, seed=seed))

    def stream():
        while True:
            yield prompts

    actor = HostActor(engine, mods.hf.HFEngine._completions, decoded)
    family = mods.rl.RLFamily(actor=actor, learner=NoLearner(), oracle=mods.functions.FunctionOracle(
        [("parity", common.parity_reward, 1.0)]), objective=GRPO(), rollout=rollout, eval_config=None, prompts=stream(),
        eval_prompts=[], seed=0, pad_token_id=151643)
    loop = mods.base.Loop(family, learner=NoLearner(), actor=actor, num_iterations=10**9, eval_every=0,
                          logger=_NoLogger(), run_dir=Path(tempfile.mkdtemp()))
    return SimpleNamespace(mods=mods, actor=actor, family=family, loop=loop, sampling=sampling)


def time_pieces(side, prompts: list[Prompt]) -> dict[str, float]:
    """Seconds of each piece, once."""
    out = {}
    start = time.perf_counter()
    completions = side.actor.generate([p.token_ids for p in prompts], side.sampling)
    out["completions"] = time.perf_counter() - start
    start = time.perf_counter()
    common.parity_reward(None, [c.text for c in completions])
    out["reward_fn"] = time.perf_counter() - start
    start = time.perf_counter()
    groups, _ = side.family.score(prompts, completions)
    out["score"] = time.perf_counter() - start
    start = time.perf_counter()
    side.family.advantages(groups)
    out["advantages"] = time.perf_counter() - start
    start = time.perf_counter()
    side.mods.batch.make_train_batch(completions, None, torch.zeros(len(completions)), 151643)
    out["make_train_batch"] = time.perf_counter() - start
    start = time.perf_counter()
    del completions, groups
    out["free_completions"] = time.perf_counter() - start
    return out


def time_step(side, iteration: int) -> dict[str, float]:
    """Seconds of one `Loop.step`: each phase, `outside` (wall time no phase timed), and the garbage collector's
    pauses in it (wherever they fell)."""
    pauses = []

    def on_gc(phase, info):
        if phase == "start":
            pauses.append(-time.perf_counter())
        else:
            pauses[-1] += time.perf_counter()

    gc.callbacks.append(on_gc)
    start = time.perf_counter()
    row = side.loop.step(iteration)
    wall = time.perf_counter() - start
    gc.callbacks.remove(on_gc)
    phases = {f"step/{k.removeprefix('time/')}": v for k, v in row.items()
              if k.startswith("time/") and k != "time/iteration"}
    return {**phases, "step/wall": wall, "step/outside": wall - row["time/iteration"],
            "step/gc_pauses": sum(pauses)}


def same_results(sides: dict, prompts: list[Prompt]) -> bool:
    """Whether every side turns the decode batch into the same completions, rewards and training batch (each
    tensor equal, in the same dtype)."""
    results = []
    for side in sides.values():
        completions = side.actor.generate([p.token_ids for p in prompts], side.sampling)
        groups, _ = side.family.score(prompts, completions)
        results.append((completions, [g.rewards for g in groups], side.family.advantages(groups)[0]))
    (completions, rewards, batch), others = results[0], results[1:]
    names = [f.name for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    return all(c == completions and r == rewards and all(
        isinstance(getattr(b, n), torch.Tensor) and getattr(b, n).dtype == getattr(batch, n).dtype
        and torch.equal(getattr(b, n), getattr(batch, n)) for n in names) for c, r, b in others)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a git revision to time the same pieces at, alternating")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--ragged", action="store_true", help="responses of random lengths (else all full)")
    parser.add_argument("--stop", nargs="*", default=[], help="stop strings cut from the texts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the medians and every run here (JSON)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from winnow.engines.hf import HFEngine

    tokenizer = common.build_tokenizer(151936, 151643)
    model = common.build_model(cpu=True, device=torch.device("cpu"))  # the engine's host part never runs it
    engine = HFEngine(model, tokenizer, device="cpu", copy_model=False)
    prompts, decoded = make_workload(args)
    sides = {"current": build(current_modules(), engine, prompts, decoded, args)}
    if args.baseline:
        sides["baseline"] = build(modules_at(args.baseline), engine, prompts, decoded, args)
    runs = {name: [] for name in sides}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for name in order:
            times = {**time_pieces(sides[name], prompts), **time_step(sides[name], repeat + 1)}
            if repeat > 0:
                runs[name].append(times)
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "workload": {k: v for k, v in vars(args).items() if k != "out"},
              "median_ms": {}, "min_ms": {}, "runs_s": runs}
    if args.baseline:
        result["same_results"] = same_results(sides, prompts)
        print(f"same completions, rewards and batch as {args.baseline}: {result['same_results']}")
    for name, rows in runs.items():
        result["median_ms"][name] = {k: 1e3 * statistics.median(r[k] for r in rows) for k in rows[0]}
        result["min_ms"][name] = {k: 1e3 * min(r[k] for r in rows) for k in rows[0]}
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def print_table(result: dict) -> None:
    med, low = result["median_ms"], result["min_ms"]
    names = list(med)
    print(f"{'piece (ms)':<22}" + "".join(f"{n + ' median':>18}{'min':>8}" for n in names))
    for key in med[names[0]]:
        print(f"{key:<22}" + "".join(f"{med[n][key]:>18.1f}{low[n][key]:>8.1f}" for n in names))


if __name__ == "__main__":
    main()
