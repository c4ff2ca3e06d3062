"""Running the operator CLIs and reading the output of service processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from coggo.settings import Settings

from tests.support.stack import Env


def settings_environment(
    settings: Settings, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    """Return os.environ with every COGGO_* variable taken from `settings`."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("COGGO_")
    }
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        environment[f"COGGO_{name.upper()}"] = str(value)
    environment["COGGO_LOG_FORMAT"] = "json"
    environment.update(extra_env or {})
    return environment


def script(command: str) -> str:
    """Return the path of a console script installed beside this Python."""
    return os.path.join(os.path.dirname(sys.executable), command)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self, code: int = 0) -> Any:
        """Parse stdout as JSON after checking the exit status."""
        assert self.code == code, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


async def run_cli(
    command: str,
    settings: Settings,
    *args: str,
    stdin: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> CliResult:
    """Run a console script to completion without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(
        script(command),
        *args,
        env=settings_environment(settings, extra_env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(
        process.communicate(None if stdin is None else stdin.encode()), timeout
    )
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode("utf-8"), stderr.decode("utf-8"))


async def admin(env: Env, *args: str, **kwargs: Any) -> CliResult:
    """Run coggo-admin against the test's database."""
    return await run_cli("coggo-admin", env.settings, *args, **kwargs)


async def dlq(env: Env, *args: str, **kwargs: Any) -> CliResult:
    """Run coggo-dlq against the test's topology."""
    return await run_cli("coggo-dlq", env.settings, *args, **kwargs)


@dataclass
class OutputReader:
    """Collects a child process's output lines on a thread, so its pipe never fills."""

    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> OutputReader:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def join(self, timeout: float = 10.0) -> list[str]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.lines

    def events(self) -> list[dict[str, Any]]:
        """Return the lines that are JSON log events, parsed."""
        found = []
        for line in list(self.lines):
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                found.append(parsed)
        return found

    def has_event(self, name: str) -> bool:
        return any(event.get("event") == name for event in self.events())
