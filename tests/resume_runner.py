"""`winnow ARGS...` with a fault injected, for tests/test_resume.py (also the entry point under torchrun).

    WINNOW_TEST_KILL="ITERATION:PHASE"   SIGKILL this process on entering PHASE of ITERATION: a loop phase
                                         (generate, score, judge, advantages, train, sync, eval), or
                                         "checkpoint" / "final": during that write, its files written, not
                                         yet renamed into place (ITERATION is the checkpoint's; any for final);
                                         "mid-sync": after the engine took the first bucket of that iteration's
                                         weight sync (run with a small --sync.bucket-mb: the engine then holds
                                         half-updated weights)
    WINNOW_TEST_PAUSE="ITERATION:PHASE:SECONDS:MARKER"
                                         on entering PHASE of ITERATION, create the file MARKER and sleep
                                         SECONDS (a window in which the test sends signals)

The learning-curve plots are skipped (they take most of a tiny run's time, and the tests are about resume).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from winnow.loops import base, checkpoint
from winnow.recipes import base as recipes_base

_now = {"iteration": 0}


def _spec(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return value.split(":") if value else None


def _at(phase: str) -> None:
    kill = _spec("WINNOW_TEST_KILL")
    if kill and int(kill[0]) == _now["iteration"] and kill[1] == phase:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = _spec("WINNOW_TEST_PAUSE")
    if pause and int(pause[0]) == _now["iteration"] and pause[1] == phase:
        Path(pause[3]).touch()
        time.sleep(float(pause[2]))


_step = base.Loop.step


def step(self, iteration):
    _now["iteration"] = iteration
    return _step(self, iteration)


_timed = base.PhaseTimer.__call__


@contextmanager
def timed(self, phase):
    _at(phase)
    with _timed(self, phase):
        yield


_fsync_tree = checkpoint.fsync_tree


def fsync_tree(path: Path) -> None:
    kill = _spec("WINNOW_TEST_KILL")
    if kill and (path.name == f".tmp-{checkpoint.checkpoint_name(int(kill[0]))}" and kill[1] == "checkpoint"
                 or path.name == ".tmp-final" and kill[1] == "final"):
        os.kill(os.getpid(), signal.SIGKILL)
    _fsync_tree(path)


from winnow.engines.hf import HFEngine  # noqa: E402

_update_weights = HFEngine.update_weights


def update_weights(self, *args, **kwargs):
    result = _update_weights(self, *args, **kwargs)
    kill = _spec("WINNOW_TEST_KILL")
    if kill and kill[1] == "mid-sync" and int(kill[0]) == _now["iteration"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


HFEngine.update_weights = update_weights
base.Loop.step = step
base.PhaseTimer.__call__ = timed
checkpoint.fsync_tree = fsync_tree
recipes_base.plot_run = lambda run_dir: None

if __name__ == "__main__":
    from winnow.cli import main

    sys.argv = ["winnow", *sys.argv[1:]]  # so the printed resume command is the user's
    main(sys.argv[1:])
