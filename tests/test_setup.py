"""A run's process set-up: torch's CPU threads, and the compile workers started before the model loads."""
from __future__ import annotations

import os

import pytest
import torch

from winnow.setup import setup_process, start_compile_workers


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_follow_omp_num_threads_unless_given(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    setup_process(0, None)
    assert torch.get_num_threads() == 1
    setup_process(0, 2)  # --num-threads wins over the environment
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")  # ignored, as torch ignores it: the default min(4, cores)
    setup_process(0, None)
    assert torch.get_num_threads() == max(1, min(4, os.cpu_count() or 1))


def test_compile_workers_start_only_when_compiling_for_a_gpu(monkeypatch):
    from torch._inductor import async_compile

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append(1))
    start_compile_workers(torch.device("cpu"), True)
    start_compile_workers(torch.device("cuda"), False)
    assert calls == []
    start_compile_workers(torch.device("cuda"), True)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_workers_are_up_before_the_first_compile():
    from torch._inductor.async_compile import AsyncCompile

    start_compile_workers(torch.device("cuda"), True)
    AsyncCompile.wait_pool_ready(timeout=120)
    assert AsyncCompile.use_process_pool()  # the first compile's kernels go to the workers, not this process
