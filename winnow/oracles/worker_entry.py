"""The entry point of a `WorkerPool` worker: `python -m winnow.oracles.worker_entry FD FN [INITIALIZER]`.

A module of winnow's own, so a worker never re-runs the user's program (see `winnow.oracles.workers`): it
dies with its parent, imports `fn` and `initializer` by their `module:qualname`, and serves the pipe `FD`.
"""
from __future__ import annotations

import sys
from multiprocessing.connection import Connection

from winnow.oracles.workers import _resolve, _worker_main, die_with_parent

if __name__ == "__main__":
    die_with_parent()
    fd, fn, initializer = (sys.argv[1:] + [""])[:3]
    _worker_main(Connection(int(fd)), _resolve(fn), _resolve(initializer))
