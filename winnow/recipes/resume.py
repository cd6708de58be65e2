"""Run directories that are never mixed, and resuming into them: which directory a run writes to, whether a
resumed config may continue the checkpoint's maths, the metrics rows a resumed run keeps, the command that
resumes, and the atomic write of `final/`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from winnow.lazy import lazy_import
from winnow.logging.metrics import METRICS_FILE
from winnow.loops.checkpoint import latest_checkpoint, write_atomically

torch = lazy_import("torch")

log = logging.getLogger(__name__)

NOT_MATHS = {"output_dir", "run_name", "num_threads", "device", "save_final", "checkpoint", "resume",
             "resume_force", "overwrite", "logging", "eval"}
"""top-level fields a resumed run may change freely: where and how it logs, evaluates and saves, not what it
trains (the device is here too: CPU and GPU kernels differ in the last bits, not in the maths)"""


def prepare_run_dir(config, prefix: str, is_main: bool) -> tuple[Path, bool]:
    """(the run directory, whether the run resumes into it). Rank 0 decides; under torchrun the answer (or
    the error) is broadcast so every rank agrees."""
    answer: tuple[Any, ...] = (None, False, None)
    if is_main:
        try:
            answer = (*_decide(config, prefix), None)
        except ValueError as e:
            answer = (None, False, str(e))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [answer]
        dist.broadcast_object_list(holder, src=0)
        answer = holder[0]
    run_dir, resumed, error = answer
    if error is not None:
        raise ValueError(error)
    return Path(run_dir), resumed


def _decide(config, prefix: str) -> tuple[Path, bool]:
    if config.resume not in (None, "auto"):
        run_dir = Path(config.resume)
        if latest_checkpoint(run_dir) is None:
            raise ValueError(f"--resume {run_dir}: no complete checkpoint in {run_dir}/checkpoints (a run writes "
                             "them with --checkpoint.every N, and on SIGINT/SIGTERM)")
        return _check_resumable(config, run_dir), True
    if config.resume == "auto":
        if config.run_name is None:
            raise ValueError("--resume auto needs --run-name (the run to continue, or to start when it has no "
                             "checkpoint); or pass --resume RUN_DIR")
        run_dir = Path(config.output_dir) / config.run_name
        if latest_checkpoint(run_dir) is not None:
            return _check_resumable(config, run_dir), True
    name = config.run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.output_dir) / name
    if config.run_name is None:  # a default name: never collide with a run started in the same second
        k = 2
        while run_dir.exists():
            run_dir, k = Path(config.output_dir) / f"{name}-{k}", k + 1
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not config.overwrite:
            has_checkpoint = latest_checkpoint(run_dir) is not None
            raise ValueError(
                f"run directory {run_dir} already holds a run: pass --overwrite to delete it and start afresh"
                + (f", or --resume {run_dir} to continue it from its last checkpoint" if has_checkpoint else
                   " (it has no checkpoint to --resume from)") + ", or choose another --run-name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, False


def _check_resumable(config, run_dir: Path) -> Path:
    """Refuse a config that would change the checkpoint's maths, unless `resume_force`; list the differences."""
    checkpoint = latest_checkpoint(run_dir)
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)) or {}
    differences = config_differences(saved, current)
    if differences:
        listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences)
        if not config.resume_force:
            raise ValueError(f"--resume {run_dir}: the config differs from the checkpoint's in what it trains "
                             f"({listing}); resume with the checkpoint's config ({checkpoint / 'config.yaml'}), "
                             "or pass --resume-force to continue with these changes")
        log.warning("resuming %s with a changed config (--resume-force): %s", run_dir, listing)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(current, sort_keys=False))
    return run_dir


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every field that differs, skipping `NOT_MATHS`."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in NOT_MATHS:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.extend(config_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            out.append((f"{prefix}{key}", old, new))
    return out


def truncate_metrics(run_dir: Path, checkpoint: Path) -> int:
    """Keep the metrics rows up to the checkpoint's iteration (a crash may have logged a few after it, or cut
    the last line short) and drop eval samples written after it; returns the rows kept."""
    iteration = int(checkpoint.name.split("_")[1])
    path = run_dir / METRICS_FILE
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= iteration:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    for sample in (run_dir / "samples").glob("eval_*.jsonl"):
        if int(sample.stem.split("_")[1]) > iteration:
            sample.unlink()
    return len(kept)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run from its newest checkpoint."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--run-name", "--output-dir"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--run-name=", "--output-dir=")) or arg in ("--overwrite", "--no-overwrite"):
            continue
        args.append(arg)
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program not in ("winnow", "cli.py", "__main__.py"):
        return f"the same command with --resume {run_dir}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc-per-node {world} -m winnow.cli" if world > 1 else "winnow"
    return " ".join([launcher, *map(shlex.quote, args), "--resume", shlex.quote(str(run_dir))])


def finish_atomically(target: Path, save: Callable[[Path], Any], model: torch.nn.Module) -> Path:
    """`save(tmp)` (every rank), then rename to `target`: a crash leaves the previous `target` or none, never
    half of one. Free space is checked against the model's size first."""
    needed = int(sum(p.numel() * p.element_size() for p in model.parameters()) * 1.1) + 2**20
    return write_atomically(Path(target), save, needed_bytes=needed, marker=False)
