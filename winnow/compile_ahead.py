"""Compile ahead: a compiling run's first iteration, replayed at launch in helper processes that fill torch's
compile caches while the run itself imports and loads its model.

A run that compiles (`--engine.compile-decode`, `--learner.compile`) on a machine whose compile caches are empty
spends ~15 s of its first iteration in Inductor at 1.5B: the decode step's glue at the first generate, the
learner layer's forward and backward at the first train step. Neither needs the trained weights, only the
shapes. So at launch, before the run loads its checkpoint, `start` spawns helpers, each running
`python -m winnow.recipes.compile_ahead FOLDER NAME` (spawned first thing, it imports while the run does):

    engine           the run's config ─► the same prompts, the same engine, learner and RL loop, on a ONE-layer
    learner          random-init copy of the model's architecture (decoder layers share one compiled graph), a
    learner-padded   random reward instead of the run's oracle ─► one iteration (the first evaluation, collect,
                     train, sync), only its part compiled, the other left eager
    kernels          the static decoder's own Triton kernels (`static_decode.compile_kernels`), launched once at
                     the model's sizes: no model, no data, done before the others have built their run

The learner's graphs for a full micro-batch and for a padded one (an attention mask) are compiled one after the other
in one process; where the run's micro-batches are rows of one mini-batch (`padded_apart`), "learner" compiles the
full one and "learner-padded", on a batch of exactly one padded micro-batch, the other, side by side.

The helpers' compiles land in the on-disk caches the run reads (Inductor's FX graph and autograd caches,
Triton's kernels). The run then meets each compile as a second launch would: it traces and loads from the
cache instead of generating and building kernels.

The run and its helpers pass the same numbered gates (`stage`): the k-th call of a part (the engine's
`generate`; the learner's `forward_ahead`, `train_policy` and no-grad forwards) waits, in the run, until each of
that part's helpers has finished its own k-th call, so the run never compiles a graph a helper is compiling. A gate
stops waiting for a helper that has exited (done or failed: the run then compiles what is left itself). The kernels
helper has no gate: a kernel it has not compiled yet is compiled where it is first launched, as without it.

A launch on caches that already hold its graphs starts no helper: helpers that all finished leave a record in
Inductor's cache folder (`record_path`: the run's model config, rollout, learner, engine, evaluation and objective
settings and torch's version, hashed), and a later launch that finds its record there compiles nothing ahead (on
warm caches the four helpers cost a 1.5B launch ~4.5 s: their imports beside the run's, and the engine gate's wait).
The record keys settings, not data: a launch on other prompts whose shapes differ compiles the difference itself, as
without helpers; deleting the record folder brings the helpers back.

What is not compiled ahead: shapes that depend on what the trained policy generates (the learner's micro-batch
lengths when responses end early; the decode step's rows after compaction). The learner helpers sample nothing: their
responses are made up, `--rollout.max-tokens` long, the padded micro-batch's last one a token shorter: their learner
shapes are those of a rollout whose longest responses reach the limit (with `--learner.compile-dynamic` the lengths
are symbolic and any length is served). Where the run's shapes differ it compiles them itself, as without this.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import getpass
import hashlib
import importlib.metadata
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
PART_OF = {"engine": "engine", "kernels": None, "learner": "learner", "learner-padded": "learner"}
"""each helper's part: the calls whose gates wait for it (the kernels helper's: none)"""
DEVICE_TYPES = ("cuda",)
"""where helpers start (a CPU compile is slow and rare; the tests add "cpu" to run the real thing there)"""
POLL_S = 0.02
HELPER_TIMEOUT_S = 600.0
"""a helper still running after this long is stopped (it would only be compiling what the run compiles anyway)"""


@dataclass
class _Helpers:
    """The run's side: each helper's process (by name) and how many of each part's gates the run has passed."""

    folder: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    passed: dict[str, int] = field(default_factory=dict)
    waited_s: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    logs_to: Path | None = None
    record: Path | None = None
    """written when every helper has finished its replay (`record_path`): a later launch of these settings skips
    them"""

    def wait(self, part: str) -> None:
        """Before the run's next call of `part`: wait until each of its helpers has finished the same call, or has
        ended."""
        names = [name for name in self.processes if PART_OF.get(name, name) == part]
        if not names:
            return
        self.passed[part] = k = self.passed.get(part, 0) + 1
        start = time.perf_counter()
        for name in names:
            self._wait_for(name, k, start)
        self.waited_s[part] = self.waited_s.get(part, 0.0) + time.perf_counter() - start

    def _wait_for(self, name: str, k: int, start: float) -> None:
        process, marker = self.processes[name], self.folder / f"{name}-{k}"
        while not marker.exists() and process.poll() is None:
            if time.perf_counter() - start > HELPER_TIMEOUT_S:
                process.kill()
                process.wait()
                break
            time.sleep(POLL_S)
        if marker.exists():
            return
        del self.processes[name]  # the helper ended before this call: the run compiles the rest itself
        self._check(name, process)

    def _check(self, name: str, process: subprocess.Popen) -> None:
        if process.returncode != 0:
            self.failed = True
            log.warning("compile ahead: the %s helper failed (exit %s; its log: %s); the run compiles its graphs "
                        "itself", name, process.returncode, self.folder / f"{name}.log")

    def stop(self) -> None:
        finished = True
        for name, process in self.processes.items():
            if process.poll() is None:
                finished = False
                process.kill()
                process.wait()
            else:  # it ended on its own (the kernels helper, which no gate waits for): did it fail?
                self._check(name, process)
        self.processes.clear()
        if finished and not self.failed and self.record is not None:
            with contextlib.suppress(OSError):  # a cache folder we may not write: the next launch starts helpers
                self.record.parent.mkdir(parents=True, exist_ok=True)
                self.record.write_text("the compile-ahead helpers of a launch with these settings finished\n")
        if self.waited_s:
            log.info("compile ahead: the run waited %s for its helpers' compiles",
                     ", ".join(f"{seconds:.1f} s ({part})" for part, seconds in self.waited_s.items()))
        if self.logs_to is not None:
            self.logs_to.mkdir(parents=True, exist_ok=True)
            for log_file in self.folder.glob("*.log"):
                shutil.copy(log_file, self.logs_to / log_file.name)
        if not self.failed:  # a failed helper's log stays for the user to read
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Helper:
    """A helper's side: its name (`PART_OF`), and how many of its part's calls it has begun."""

    name: str
    folder: Path
    spawned_at: float
    """the run's clock (time.time) when it spawned this helper"""
    compile_seconds: Callable[[], float] = lambda: 0.0
    """seconds this process has spent in torch.compile so far (`winnow.loops.base.compile_seconds`)"""
    begun: int = 0

    @property
    def part(self) -> str | None:
        return PART_OF.get(self.name, self.name)

    @contextlib.contextmanager
    def call(self, part: str) -> Iterator[None]:
        """Number the call as it begins (as the run numbers its waits; a call may nest another), mark it done
        when it returns."""
        if part != self.part:
            yield
            return
        self.begun = k = self.begun + 1
        yield
        (self.folder / f"{self.name}-{k}").touch()
        log.info("compile ahead: %s call %d done, %.1f s after the run spawned this helper (torch.compile %.1f s so "
                 "far)", part, k, time.time() - self.spawned_at, self.compile_seconds())


_role: _Helpers | _Helper | None = None


def become_helper(name: str, folder: Path, device_types: tuple[str, ...], spawned_at: float,
                  compile_seconds: Callable[[], float]) -> None:
    """This process is the helper `name` (`winnow.recipes.compile_ahead`): its calls of its part mark their ends."""
    global _role, DEVICE_TYPES
    _role, DEVICE_TYPES = _Helper(name, folder, spawned_at, compile_seconds), device_types


def seconds_since_spawn() -> float:
    """In a helper: seconds since the run spawned it (the run's clock); elsewhere 0."""
    return time.time() - _role.spawned_at if isinstance(_role, _Helper) else 0.0


def keep_logs(run_dir: Path) -> None:
    """Copy the helpers' logs into RUN_DIR/compile_ahead/ when the run ends (what they compiled, and when)."""
    if isinstance(_role, _Helpers):
        _role.logs_to = Path(run_dir) / "compile_ahead"


@contextlib.contextmanager
def stage(part: str) -> Iterator[None]:
    """A numbered gate around a call of `part` that may compile: in the run, wait first for its helper to have
    finished the same call; in a helper, say when it has. Elsewhere nothing."""
    if isinstance(_role, _Helper):
        with _role.call(part):
            yield
        return
    if isinstance(_role, _Helpers):
        _role.wait(part)
    yield


def gate(part: str) -> Callable[[F], F]:
    """A method decorator: each call runs inside `stage(part)`."""
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def gated(*args, **kwargs):
            with stage(part):
                return method(*args, **kwargs)
        return gated  # type: ignore[return-value]
    return decorate


def parts_to_compile(config) -> list[str]:
    """The parts a run compiles that a helper can compile ahead (`--compile-ahead`): a fresh local run of one
    process with one learner device (a resumed run's first calls are not the replayed ones)."""
    if not (config.compile_ahead and config.runtime == "local" and config.learner.strategy == "single"
            and not config.resume and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        return []
    parts = []
    if config.engine_backend == "hf" and config.engine.compile_decode:
        parts.append("engine")
    if config.learner.compile:
        parts.append("learner")
    return parts


def helpers_to_start(config) -> list[str]:
    """The helpers a run starts (`PART_OF`): the engine's with the kernels helper beside it (unless the engine decodes
    with transformers' own loop, which launches no kernel of winnow's), the learner's, split in two where
    `padded_apart`."""
    names = []
    if not config.model.path:  # the run stops at once, asking for one
        return names
    for part in parts_to_compile(config):
        if part == "engine":
            names += ["engine"] if config.engine.decode == "hf" else ["engine", "kernels"]
        else:
            names += ["learner", "learner-padded"] if padded_apart(config) is not None else ["learner"]
    return names


def record_path(config) -> Path | None:
    """Where a launch of `config`'s shapes records that its helpers finished: a file named after what its first
    iteration's graphs depend on (the model's config.json, the rollout, learner, engine, evaluation and objective
    settings, the device, the prompt length limit, torch's version), in the folder of Inductor's caches
    (TORCHINDUCTOR_CACHE_DIR, else torch's default), so that it goes when the caches go. None where that folder
    cannot be named."""
    model_json = Path(config.model.path) / "config.json" if config.model.path else None
    try:
        settings = {
            "model": model_json.read_text() if model_json and model_json.is_file() else str(config.model.path),
            **{name: repr(getattr(config, name, None)) for name in ("algo", "rollout", "learner", "engine", "eval",
                                                                    "device", "engine_backend")},
            "max_prompt_tokens": config.data.max_prompt_tokens, "torch": importlib.metadata.version("torch")}
        folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser()))
    except (OSError, KeyError, ImportError):  # no installed torch, no user name
        return None
    key = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:20]
    return Path(folder) / "winnow-compile-ahead" / key


def padded_apart(config) -> int | None:
    """Where a learner helper of its own compiles the graphs of a padded micro-batch: the prompts whose samples
    make exactly one of the run's micro-batches. That is where micro-batches are `micro_batch_size` rows of one
    mini-batch, prompts not shared, a whole number of prompts' samples, and the run has at least one. None elsewhere
    (micro-batches by tokens or memory, several mini-batches): there one helper compiles both kinds, on the run's
    batch with its last response a token short."""
    rollout, learner = config.rollout, config.learner
    rows, samples = learner.micro_batch_size, rollout.num_samples
    if (learner.micro_batch_tokens or learner.micro_batch_memory or learner.share_prompts
            or learner.num_mini_batches != 1 or rows % samples or rows // samples > rollout.prompts_per_iteration):
        return None
    return rows // samples


def memory_format_named(name: str):
    """`torch.<name>`, a memory format (how `pickle_memory_formats_by_name` pickles one)."""
    import torch

    return getattr(torch, name)


def _reduce_memory_format(memory_format) -> tuple:
    return memory_format_named, (str(memory_format).removeprefix("torch."),)


def pickle_memory_formats_by_name() -> None:
    """Pickle `torch.memory_format`s by their name in `torch`, the same in every process. Torch's compile caches
    key a graph by pickling its inputs' metadata, memory format included; a memory format (`torch.contiguous_format`)
    has no module of its own, so pickle names it after the first module in `sys.modules` whose `torch` attribute
    reaches it, which depends on the order a process imported its modules (the run's and its helper's differ), and
    the same graph got a different key in each. Every compiling run and helper calls this before it compiles
    (`winnow.setup.start_compile_workers`)."""
    import copyreg

    import torch

    copyreg.pickle(torch.memory_format, _reduce_memory_format)


def may_run_on(device_name: str) -> bool:
    """Whether `--device` may name a device helpers compile for, decided without importing torch ("auto" may be a
    GPU: a helper that finds none exits at once)."""
    return device_name == "auto" or device_name.split(":")[0] in DEVICE_TYPES


def start(config) -> None:
    """Spawn a helper for each part `config` compiles, first thing in the run (before it imports torch and loads its
    model: the helpers import in parallel). The helpers end with the run (`stop`, at exit, or by the kernel if the run
    is killed)."""
    global _role
    names = helpers_to_start(config) if may_run_on(config.device) else []
    if not names or _role is not None:
        return
    record = record_path(config)
    if record is not None and record.exists():
        log.info("compile ahead: an earlier launch with these settings compiled this run's graphs into the caches "
                 "(%s); no helpers", record)
        return
    folder = Path(tempfile.mkdtemp(prefix="winnow-compile-ahead-"))
    with open(folder / "config.pickle", "wb") as f:
        pickle.dump({"config": config, "device_types": DEVICE_TYPES, "spawned_at": time.time()}, f)
    helpers = _Helpers(folder, record=record)
    for name in names:
        with open(folder / f"{name}.log", "wb") as out:
            helpers.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "winnow.recipes.compile_ahead", str(folder), name],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _role = helpers
    atexit.register(stop)
    log.info("compile ahead: %s compiled at launch in helper processes (%s)",
             " and ".join(parts_to_compile(config)), ", ".join(names))


def stop() -> dict[str, float]:
    """End the helpers (if any still run); returns how long the run waited for each part's helper."""
    global _role
    if not isinstance(_role, _Helpers):
        return {}
    helpers, _role = _role, None
    helpers.stop()
    return dict(helpers.waited_s)
