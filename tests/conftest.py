"""Shared fixtures: a tiny tokenizer and model, built locally (nothing downloads)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Under pytest-xdist the workers share the cores: one thread each, for them and the runs they start (more threads
# than cores makes small CPU runs many times slower, see winnow.setup.setup_process).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(_threads)
torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from winnow.data.tiny import train_char_tokenizer

    return train_char_tokenizer(["0123456789+-*= "])


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from winnow.data.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0)
