"""A pool of persistent worker processes with a hard per-item deadline, for graders that can hang.

`WorkerPool.map` hands items to idle workers as they free up. An item whose worker has not answered
`timeout` seconds after it was handed over is given up (None), and that worker is killed and replaced: the
only reliable way to stop code stuck in a C call or a runaway sympy simplification. Workers hold no state,
so killing one loses nothing but the item in hand.

Workers start as fresh interpreters from winnow's own entry point (`python -m winnow.oracles.worker_entry`),
never from the user's program: a fork of the trainer (CUDA, torch's threads) is unsafe, and multiprocessing's
"spawn" and "forkserver" re-run the user's `__main__` in every worker, so a script that graded at top level
without an `if __name__ == "__main__":` guard started pools recursively and every worker died. A worker
imports `fn` and `initializer` by name, and dies with its parent (PR_SET_PDEATHSIG on Linux; everywhere,
the end of its pipe). A replacement costs an interpreter start (about a second with math-verify) instead
of a fork. The multiprocessing start methods stay available (`start_method="forkserver"`).
"""
from __future__ import annotations

import ctypes
import importlib
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

_READY = "ready"
_MAX_START_FAILURES = 3  # workers in a row that die before they are ready, before the pool gives up


def _worker_main(conn: Connection, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
    """A worker process: runs `initializer`, says it is ready, then answers each item with `fn(*item)`,
    or None when that raised. Exits on a None item or when the parent's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then closes the pool
    if initializer is not None:
        initializer()
    conn.send(_READY)  # after any warm-up, so an item's deadline never counts start-up
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            result = fn(*item)
        except Exception:
            result = None
        conn.send(result)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a no-op.
    A `kill -9` of the parent then leaves no orphan holding a port or a CPU."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the prctl took hold
        os._exit(1)


def _qualified_name(fn: Callable[..., Any]) -> str:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<" in name:
        raise ValueError(f"{fn!r}: a worker function must be defined at the top level of an importable module, "
                         f"so the worker can import it by name (not in __main__, not a lambda or a closure)")
    return f"{module}:{name}"


def _resolve(qualified: str) -> Callable[..., Any] | None:
    if not qualified:
        return None
    module, _, name = qualified.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


class _ModuleProcess:
    """A worker interpreter started with `python -m winnow.oracles.worker_entry FD FN INITIALIZER`, with the few
    methods of `multiprocessing.Process` the pool uses."""

    def __init__(self, fd: int, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
        env = dict(os.environ)
        # The parent's import path (as multiprocessing's spawn passes it), so `fn` imports the same way.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        command = [sys.executable, "-m", "winnow.oracles.worker_entry", str(fd), _qualified_name(fn),
                   _qualified_name(initializer) if initializer is not None else ""]
        self.popen = subprocess.Popen(command, pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        self.popen.kill()

    def join(self) -> None:
        self.popen.wait()

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
        if ctx is None:  # winnow's own entry point
            parent_socket, child_socket = socket.socketpair()
            self.conn = Connection(parent_socket.detach())
            child_fd = child_socket.detach()
            try:
                self.process: Any = _ModuleProcess(child_fd, fn, initializer)
            finally:
                os.close(child_fd)  # so the parent reads EOF on `conn` when the worker dies
        else:
            self.conn, child_conn = ctx.Pipe()
            self.process = ctx.Process(target=_worker_main, args=(child_conn, fn, initializer),
                                       name=f"winnow-{getattr(fn, '__name__', 'worker')}", daemon=True)
            self.process.start()
            child_conn.close()  # so the parent reads EOF on `conn` when the worker dies
        self.started_at = time.monotonic()
        self.is_ready = False

    def stop(self) -> None:
        """Kill outright: a worker holds no state worth a polite shutdown, and may be stuck."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    """Empty the pool's list first: a call still running in another thread (at interpreter exit) then sees
    a stopped pool, instead of replacing the workers it sees die."""
    stopping = list(workers)
    workers.clear()
    for worker in stopping:
        worker.stop()


class WorkerPool:
    """`num_workers` processes that apply `fn` to items, each item within `timeout` seconds.

    `fn` and `initializer` must be module-level functions (they are pickled by name). Workers start on
    first use or on `start()`. Thread-safe: concurrent calls take turns. `close()` (or leaving a `with`
    block) stops the workers; so do garbage collection and interpreter exit.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        num_workers: int = 2,
        timeout: float = 5.0,
        initializer: Callable[[], None] | None = None,
        start_method: str = "module",
        start_timeout: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        self.fn, self.initializer = fn, initializer
        self.num_workers = num_workers
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.num_restarts = 0
        """workers killed and replaced after a timeout or a crash, over the pool's life"""
        if start_method == "module":
            _qualified_name(fn)  # fail here, not in a worker, on a function a worker cannot import
            if initializer is not None:
                _qualified_name(initializer)
        self._ctx = None if start_method == "module" else mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._is_closed = False
        self._num_start_failures = 0
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def map(self, items: Sequence[tuple], timeout: float | None = None) -> list[Any]:
        """`fn(*item)` for each item, in order; None where it overran `timeout` (default: the pool's) or
        raised, or its worker died."""
        with self._lock:
            self._start()
            return self._run(list(items), timeout or self.timeout)

    def start(self) -> None:
        """Start any missing workers and wait until all are ready."""
        with self._lock:
            self._start()
            self._run([], self.timeout, wait_until_ready=True)

    def _start(self) -> None:
        if self._is_closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.fn, self.initializer))

    def _run(self, items: list[tuple], timeout: float, wait_until_ready: bool = False) -> list[Any]:
        """Hand items to ready workers as they free up; collect results until every item is answered or
        given up on. Blocks in `wait` on the pipes of busy and starting workers, until the next deadline."""
        results: list[Any] = [None] * len(items)
        todo = deque(range(len(items)))
        running: dict[_Worker, tuple[int, float]] = {}  # worker -> (item index, deadline)
        try:
            # an empty pool was stopped under us (at interpreter exit): items left stay None
            while self._workers and (todo or running or (wait_until_ready and not self._are_ready())):
                self._dispatch(items, todo, running, timeout)
                listening = [w for w in self._workers if w in running or not w.is_ready]
                deadlines = [d for _, d in running.values()]
                deadlines += [w.started_at + self.start_timeout for w in listening if not w.is_ready]
                wait([w.conn for w in listening], timeout=max(0.0, min(deadlines) - time.monotonic()))
                for worker in listening:
                    if worker.conn.poll():
                        self._receive(worker, running, results)
                self._expire(running)
        except BaseException:
            # Interrupted (Ctrl-C, a start failure): a busy worker's late answer would be read as the answer
            # to the next call's item, so busy workers go.
            for worker in running:
                self._replace(worker)
            raise
        return results

    def _are_ready(self) -> bool:
        return all(w.is_ready for w in self._workers)

    def _dispatch(self, items: list[tuple], todo: deque, running: dict, timeout: float) -> None:
        for worker in list(self._workers):
            if todo and worker.is_ready and worker not in running:
                index = todo.popleft()
                try:
                    worker.conn.send(items[index])
                except OSError:  # it died while idle (OOM killer, ...): the item goes to its replacement
                    todo.appendleft(index)
                    self._replace(worker)
                    continue
                running[worker] = (index, time.monotonic() + timeout)

    def _receive(self, worker: _Worker, running: dict, results: list[Any]) -> None:
        """Take one message from a worker: its start-up signal, an item's result, or its death."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # it died: a crash in C, or killed from outside
            if not worker.is_ready:
                self._num_start_failures += 1
                if self._num_start_failures >= _MAX_START_FAILURES:
                    raise RuntimeError(
                        f"{_MAX_START_FAILURES} workers in a row died while starting (exit code "
                        f"{worker.process.exitcode}); call {self.initializer} in this process to see why"
                    ) from None
            running.pop(worker, None)  # its item, if any, stays None
            self._replace(worker)
            return
        if not worker.is_ready:  # a worker's first message says it is ready (whatever `fn` may return)
            worker.is_ready = True
            self._num_start_failures = 0
        else:
            index, _ = running.pop(worker)
            results[index] = message

    def _expire(self, running: dict) -> None:
        """Give up on items past their deadline, replacing their workers; fail on a worker stuck starting."""
        now = time.monotonic()
        for worker, (_, deadline) in list(running.items()):
            if now >= deadline:
                del running[worker]
                self._replace(worker)
        for worker in self._workers:
            if not worker.is_ready and now - worker.started_at > self.start_timeout:
                raise RuntimeError(f"a worker did not start within {self.start_timeout}s")

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        if worker in self._workers:  # it is not once the pool is stopped, at interpreter exit
            self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.fn, self.initializer)
            self.num_restarts += 1

    def close(self) -> None:
        """Stop the workers. Idempotent; a closed pool refuses further work."""
        with self._lock:
            self._is_closed = True
            self._finalizer()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

