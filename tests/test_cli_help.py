"""`winnow COMMAND --help` builds every command's config dataclasses without importing torch (or transformers):
the help answers at once instead of after seconds of imports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from winnow.algorithms import OBJECTIVES, PREFERENCE_OBJECTIVES  # the registries themselves are torch-free
from winnow.cli import main

commands = [["train", name] for name in [*OBJECTIVES, *PREFERENCE_OBJECTIVES, "rm"]]
commands += [["train"], ["sft"], ["eval"], ["quickstart"], ["init-model"], ["serve-oracle"], ["plot"]]
for command in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*command, "--help"])
    assert "--" in out.getvalue(), (command, out.getvalue()[:300])
    loaded = [m for m in ("torch", "transformers", "datasets") if m in sys.modules]
    assert not loaded, f"winnow {' '.join(command)} --help imported {loaded}"
print(len(commands), "commands")
"""


def test_every_commands_help_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from winnow.algorithms import OBJECTIVES, PREFERENCE_OBJECTIVES

    num_commands = len(OBJECTIVES) + len(PREFERENCE_OBJECTIVES) + 1 + 7
    assert proc.stdout.split() == [str(num_commands), "commands"]
