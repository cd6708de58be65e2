"""Moved to `winnow.setup` (kept importable from here for one release)."""
from winnow.setup import load_policy, load_tokenizer, make_run_dir, resolve_device, setup_process, shared_run_dir

__all__ = ["load_policy", "load_tokenizer", "make_run_dir", "resolve_device", "setup_process", "shared_run_dir"]
