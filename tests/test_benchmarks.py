"""The GRPO-iteration benchmark's CPU mode runs end to end (issue 5, item 5): a smoke test that keeps the
benchmark script working as the code under it changes. It asserts what the run did, never how fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_benchmark_cpu_mode_runs(tmp_path):
    out = tmp_path / "winnow.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_iteration.py"), "--cpu", "--iterations", "1",
                    "--out", str(out)], check=True, timeout=600, env=env, cwd=ROOT)
    result = json.loads(out.read_text())
    workload = result["workload"]
    assert workload["generated_tokens"] == 4 * 4 * 32 and workload["trained_tokens"] == 16 * (16 + 32)
    phases = result["phases_median_s"]
    for phase in ("generate", "score", "advantages", "train", "sync", "end_to_end"):
        assert phases[phase] >= 0, phase
    assert phases["end_to_end"] >= phases["generate"] + phases["train"]
    assert result["floors"]["train_s"] > 0 and result["floors"]["generate_s"] > 0
    assert len(result["phases_per_iteration_s"]) == 1
