"""Checkpoints that resume a run exactly, written so that a crash never leaves half of one.

A checkpoint `RUN_DIR/checkpoints/iter_NNNNN/` holds everything the next iteration depends on:

    policy/       the policy learner's `save_checkpoint`: weights (a LoRA policy: base and adapters), AdamW
                  state, scheduler and step count, in the strategy's own format (single: one `checkpoint.pt`;
                  fsdp2: `torch.distributed.checkpoint` shards; deepspeed: its ZeRO shards)
    critic/       the same for PPO's critic, when there is one
    reference.pt  the frozen reference's weights (single strategy; a sharded run rebuilds it from --model.path)
    state_rank<R>.pt  the iteration, the family's state (counters, the data stream's position, the pair
                  selector's state: its rng, SEA's ensemble with its optimizer and replay buffer, XPO's
                  reference sampling count), and every generator: python, numpy, torch CPU and CUDA (per rank)
    config.yaml   the resolved config of the run that wrote it
    COMPLETE      written last: a directory without it is not a checkpoint

The engine's sampling holds no state to save: its noise is keyed per (iteration seed, prompt, sample)
(`winnow.engines.sampling`), so the same iteration draws the same tokens from the same weights.

Atomic: everything is written into `checkpoints/.tmp-iter_NNNNN`, each file fsynced, then the directory is
renamed into place and the parent fsynced; only then are checkpoints beyond `keep` deleted, oldest first. A
crash at any point leaves the previous checkpoint complete. Free space is checked against the previous
checkpoint's size (the first time, an estimate from the parameter count) before anything is written.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from winnow.lazy import lazy_import

torch = lazy_import("torch")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


@dataclass
class CheckpointConfig:
    """When the loop writes a checkpoint to RUN_DIR/checkpoints (and always on SIGINT/SIGTERM)."""

    every: int = 0
    """policy iterations between checkpoints; 0 writes one only when the run is interrupted"""
    keep: int = 2
    """complete checkpoints kept (the oldest are deleted once a newer one is complete); >= 1"""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0 (--checkpoint.every)")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1 (--checkpoint.keep)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (no space, an I/O error) or read."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:05d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("iter_*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (so the names are durable too)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rng_state() -> dict[str, Any]:
    """Every generator of this process: python, numpy, torch CPU and (where present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def counters_state(counters) -> dict[str, Any]:
    return {f.name: getattr(counters, f.name) for f in fields(counters)}


def load_counters(counters, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(counters, name, value)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def _all_ranks_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (so every rank raises together, never one alone)."""
    dist = _dist()
    if dist is None:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) == 0


def agreed_signal(signum: int | None) -> int | None:
    """The signal any rank received (all ranks must stop together: saving is a collective)."""
    dist = _dist()
    if dist is None:
        return signum
    flag = torch.tensor([signum or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


def write_atomically(target: Path, write, *, needed_bytes: int, marker: bool = True) -> Path:
    """Call `write(tmp_dir)` on every rank, then (rank 0) fsync it and rename it to `target`.

    A previous `target` is kept until the new one is complete. Before writing, `needed_bytes` is checked
    against the free space of the file system; on a full disk (or any I/O error) the temporary directory is
    removed and a `CheckpointError` says so: what was there before is untouched."""
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}"
    rank = _rank()
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # the leftover of a crash: never a checkpoint (it has no COMPLETE)
        free = shutil.disk_usage(target.parent).free
        problem = (f"{free / 2**20:.0f} MiB free at {target.parent}, but this write needs about "
                   f"{needed_bytes / 2**20:.0f} MiB") if free < needed_bytes else None
    else:
        problem = None
    barrier()
    if not _all_ranks_ok(problem is None):
        raise CheckpointError(f"not writing {target.name}: {problem or 'too little free space on rank 0'}; "
                              "free some space (or lower --checkpoint.keep) and resume from the last good checkpoint")
    error = None
    try:
        write(tmp)
    except OSError as e:  # ENOSPC and friends: the write failed, the previous checkpoint did not
        error = e
    if not _all_ranks_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {target.name} failed ({error or 'on another rank'}); nothing was "
                              "replaced: the last good checkpoint is intact") from error
    barrier()
    if rank == 0:
        if marker:
            (tmp / COMPLETE).write_text("ok\n")
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".old-{target.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


class Checkpointer:
    """Saves and restores a loop's whole state in RUN_DIR/checkpoints (see the module docstring)."""

    def __init__(self, run_dir: Path, config: CheckpointConfig, learners: dict[str, Any], *,
                 config_yaml: str = "", resume_from: Path | None = None, resume_command: str = ""):
        self.run_dir, self.config, self.learners = Path(run_dir), config, learners
        self.config_yaml, self.resume_from, self.resume_command = config_yaml, resume_from, resume_command
        self.last_saved: Path | None = latest_checkpoint(self.run_dir)

    def should_save(self, iteration: int) -> bool:
        return self.config.every > 0 and iteration % self.config.every == 0

    def save(self, iteration: int, family) -> Path:
        """Write iteration `iteration`'s checkpoint (a collective under torchrun) and prune old ones."""
        target = self.run_dir / CHECKPOINTS / checkpoint_name(iteration)
        rank = _rank()

        def write(tmp: Path) -> None:
            if rank == 0:
                tmp.mkdir(parents=True, exist_ok=True)
            barrier()
            for name, learner in self.learners.items():
                learner.save_checkpoint(tmp / name)
            policy = self.learners["policy"]
            if rank == 0 and policy.ref_model is not None and policy.config.strategy == "single":
                torch.save(policy.ref_model.state_dict(), tmp / "reference.pt")
            torch.save({"iteration": iteration, "family": family.state_dict(), "rng": rng_state()},
                       tmp / f"state_rank{rank}.pt")
            if rank == 0:
                (tmp / "config.yaml").write_text(self.config_yaml)

        write_atomically(target, write, needed_bytes=self._expected_bytes())
        self.last_saved = target
        if rank == 0:
            self._prune()
        barrier()
        return target

    def restore(self, family) -> int:
        """Load `resume_from` into the learners, the family and the generators; returns its iteration."""
        path = self.resume_from
        if path is None or not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} file)")
        rank = _rank()
        state_file = path / f"state_rank{rank}.pt"
        if not state_file.is_file():
            raise CheckpointError(f"{path} has no {state_file.name}: it was written by a run with a different "
                                  "number of processes; resume with the same world size")
        for name, learner in self.learners.items():
            if not (path / name).exists():
                raise CheckpointError(f"{path} has no {name}/ checkpoint: it was written by a different method")
            learner.load_checkpoint(path / name)
        policy = self.learners["policy"]
        if (path / "reference.pt").is_file() and policy.ref_model is not None:
            policy.ref_model.load_state_dict(torch.load(path / "reference.pt", map_location=policy.device))
        state = torch.load(state_file, weights_only=False)
        family.load_state_dict(state["family"])
        set_rng_state(state["rng"])
        return int(state["iteration"])

    def _expected_bytes(self) -> int:
        """The size of the last checkpoint, else weights + 2 AdamW moments per trainable learner; with margin."""
        if self.last_saved is not None and self.last_saved.is_dir():
            size = tree_bytes(self.last_saved)
        else:
            size = 0
            for learner in self.learners.values():
                params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
                size += 3 * params
            ref = getattr(self.learners["policy"], "ref_model", None)
            if ref is not None:
                size += sum(p.numel() * p.element_size() for p in ref.parameters())
        return int(size * 1.1) + 2**20

    def _prune(self) -> None:
        root = self.run_dir / CHECKPOINTS
        done = sorted(p for p in root.glob("iter_*") if (p / COMPLETE).is_file())
        for old in done[: -self.config.keep]:
            shutil.rmtree(old, ignore_errors=True)


class StopRequest:
    """SIGINT/SIGTERM while the loop runs: the first finishes the current iteration, then the loop writes a
    checkpoint and exits with the command that resumes; a second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: stopped at once, without a checkpoint")
        self.signum = signum
        print(f"\nwinnow: {signal.Signals(signum).name} received: finishing this iteration, then writing a "
              "checkpoint (SIGINT again stops at once)", file=sys.stderr, flush=True)
