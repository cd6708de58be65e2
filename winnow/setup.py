"""What every run does before its loop: threads, seeds, device, run directory, model and tokenizer."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from winnow import compile_ahead
from winnow.lazy import lazy_import

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

torch = lazy_import("torch")
transformers = lazy_import("transformers")


@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str | None = None
    """a hub id or a local directory with a `transformers` causal LM (`winnow quickstart` writes one)"""
    tokenizer: str | None = None
    """tokenizer hub id or directory; defaults to `path`"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""


def setup_process(seed: int, num_threads: int | None) -> None:
    """Seed every generator and set torch's CPU threads.

    More threads than free cores makes small-model CPU runs many times slower (measured: 40 s alone vs
    ~600 s beside two busy processes with 2 threads), so the default is OMP_NUM_THREADS where it is set, else
    min(4, cores).
    """
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    from_env = int(from_env) if from_env.isdigit() else 0  # unset, 0 or not a number: the default
    torch.set_num_threads(num_threads or from_env or max(1, min(4, os.cpu_count() or 1)))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_compile_workers(device: torch.device, compiling: bool) -> None:
    """Start torch.compile's kernel-building worker processes now, while the model loads. Inductor starts them at
    its first compile, and until they are up (seconds) it builds that compile's kernels one at a time in this
    process. No-op unless something is compiled for a GPU. A compiling run also keys its graphs as its
    compile-ahead helpers do (`compile_ahead.pickle_memory_formats_by_name`), with helpers or without."""
    if compiling:
        compile_ahead.pickle_memory_formats_by_name()
    if not compiling or device.type != "cuda":
        return
    try:
        from torch._inductor import async_compile
    except ImportError:  # a torch without Inductor compiles nothing
        return
    async_compile.maybe_warm_pool()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use --device cpu")
    return device


def make_run_dir(output_dir: str, run_name: str | None, prefix: str) -> Path:
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(output_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_run_dir(output_dir: str, run_name: str | None, prefix: str, is_main: bool) -> Path:
    """`make_run_dir` on rank 0, its path broadcast to the other ranks (a timestamped name could differ)."""
    import torch.distributed as dist

    path = make_run_dir(output_dir, run_name, prefix) if is_main else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is masked everywhere; EOS is a safe stand-in and keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_path(path: str, flag: str) -> None:
    """Refuse at once a local path that does not exist, rather than let `from_pretrained` take it for a hub id
    and retry the hub for a minute. A hub id is `name` or `org/name`; anything else (absolute, relative with
    ./ or ../, ~, or more than one /) is a directory, and so is any path when HF_HUB_OFFLINE is set."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{flag} {path} is a file; pass the model's directory (with config.json)")
        return
    looks_local = (path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1
                   or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"))
    if looks_local:
        raise FileNotFoundError(f"{flag} {path}: the directory does not exist")


def load_policy(model_config) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The policy model (fp32, on CPU; the learner moves it) and its tokenizer."""
    if model_config.path is None:
        raise ValueError(
            "no model given: pass --model.path (a hub id or a local directory); "
            "`winnow quickstart` builds a tiny one to start from"
        )
    check_model_path(model_config.path, "--model.path")
    if model_config.tokenizer:
        check_model_path(model_config.tokenizer, "--model.tokenizer")
    tokenizer = load_tokenizer(model_config.tokenizer or model_config.path, model_config.trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_config.path, dtype=torch.float32, trust_remote_code=model_config.trust_remote_code
    )
    return model, tokenizer
