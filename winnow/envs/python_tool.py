"""A Python tool inside any episode: the policy writes code, the observation is what the code printed.

Shaped like GEM's tools (`gem.tools.python_code_tool.PythonCodeTool` under `gem.tools.tool_env_wrapper.
ToolEnvWrapper`): a tool has `instruction_string()` and `execute_action(action) -> (is_parsed, has_error,
observation, parsed_action)`, and `ToolEnv` wraps an environment so that an action holding code runs the code
(the wrapped environment does not step; reward 0) and any other action steps the environment.

The code runs in a fresh `python -I` subprocess: a wall-clock limit (killed at the limit), an address-space limit
(`RLIMIT_AS`), no network (sockets raise; a guard against accidents, not a security sandbox: run untrusted
models' code in a container), an empty working directory that is deleted after, and output cut to `max_output`
characters.
"""
from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from winnow.envs.base import Env

CODE_PATTERN = re.compile(r"<python>(.*?)</python>|```python\n(.*?)```", re.DOTALL)
"""code is read from `<python>...</python>` (GEM's tag) or a ```python fenced block; the last one counts"""

_LAUNCHER = """\
import socket, sys
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the python tool")
socket.socket = socket.create_connection = socket.getaddrinfo = _no_network
exec(compile(sys.argv[1], "<code>", "exec"), {"__name__": "__main__"})
"""
"""runs the code (argv[1]) with sockets disabled; tracebacks name the code's own lines (File "<code>")"""


@dataclass
class PythonToolConfig:
    """Limits of one run of the policy's code."""

    timeout_s: float = 5.0
    """wall-clock seconds before the code is killed"""
    memory_mb: int = 512
    """address-space limit of the subprocess (RLIMIT_AS), in MiB"""
    max_output: int = 1000
    """characters of stdout+stderr returned as the observation (the rest is cut, and says so)"""


class PythonTool:
    """Runs the code of an action in a limited subprocess; GEM's tool shape."""

    tool_type = "python"
    name = "python"

    def __init__(self, config: PythonToolConfig | None = None):
        self.config = config or PythonToolConfig()

    def instruction_string(self) -> str:
        return "To run Python, write <python>code</python>; you will see what it prints."

    def execute_action(self, action: str) -> tuple[bool, bool, str, str]:
        """(is_parsed, has_error, observation, parsed_action): is_parsed is False when the action holds no code."""
        matches = list(CODE_PATTERN.finditer(action))
        if not matches:
            return False, False, "", action
        code = next(g for g in matches[-1].groups() if g is not None)
        observation, has_error = run_python(code, self.config)
        return True, has_error, observation, code


def run_python(code: str, config: PythonToolConfig) -> tuple[str, bool]:
    """Run `code` under the limits; returns (stdout+stderr, cut to max_output, and whether it failed)."""
    limit = config.memory_mb * 1024 * 1024

    def limit_memory() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryDirectory(prefix="winnow-tool-") as workdir:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _LAUNCHER, code], cwd=workdir, capture_output=True,
                                  text=True, timeout=config.timeout_s, preexec_fn=limit_memory, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"timed out after {config.timeout_s:g} s", True
    output = done.stdout + done.stderr
    if len(output) > config.max_output:
        output = output[: config.max_output] + f"\n... ({len(output) - config.max_output} characters cut)"
    return output, done.returncode != 0


class ToolEnv:
    """`env` with tools: an action that a tool parses runs the tool, up to `max_tool_uses` per episode; any
    other action steps `env` (GEM's `ToolEnvWrapper`, with `tool_reward` 0)."""

    def __init__(self, env: Env, tools: list[Any], max_tool_uses: int = 5):
        self.env, self.tools, self.max_tool_uses = env, tools, max_tool_uses
        self.num_tool_uses = 0

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self.num_tool_uses = 0
        observation, info = self.env.reset(seed=seed)
        instructions = "\n".join(tool.instruction_string() for tool in self.tools)
        return f"{observation}\n{instructions}", {**info, "tool_uses": 0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.num_tool_uses < self.max_tool_uses:
            for tool in self.tools:
                is_parsed, has_error, observation, _ = tool.execute_action(action)
                if is_parsed:
                    self.num_tool_uses += 1
                    return observation, 0.0, False, False, {"tool": tool.name, "tool_error": has_error,
                                                            "tool_uses": self.num_tool_uses}
        return self.env.step(action)
