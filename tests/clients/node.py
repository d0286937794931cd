"""Run the JavaScript clients of this directory (Node scripts) from pytest, and skip or fail when they cannot run.

A script talks JSON lines: it reports on stdout (`{"kind": …}`) and reads the test's commands on stdin, so the test
stays the one that acts on Parley (adds messages, cuts connections) and asserts, while the client is a real one.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
MODULES = HERE / "node_modules"
PACKAGES = ("openai", "eventsource", "playwright-core")
CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("PARLEY_REQUIRE_CLIENTS") == "1"
"""CI sets it: a missing Node, package or browser is then a failure, not a skip."""


def unavailable(reason: str) -> None:
    """Skip (on a developer's machine without the JavaScript tools), or fail (where CI installed them)."""
    if REQUIRED:
        pytest.fail(f"PARLEY_REQUIRE_CLIENTS=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason} (bash .ci/run installs it; `npm ci --prefix tests/clients`)")


def node_missing() -> str | None:
    """Why the Node clients cannot run here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node is not on PATH"
    major = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if not major.startswith("v") or int(major[1:].split(".")[0]) < 20:
        return f"node {major} is older than 20"
    missing = [p for p in PACKAGES if not (MODULES / p / "package.json").is_file()]
    if missing:
        return f"tests/clients/node_modules lacks {', '.join(missing)}"
    return None


def chromium_missing() -> str | None:
    return (
        None
        if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)
        else f"{CHROMIUM} is not installed (Debian package chromium)"
    )


class NodeScript:
    """One running client script. `expect` reads its reports up to the one wanted, each wait bounded."""

    def __init__(self, script: str, args: dict[str, Any], log_dir: Path) -> None:
        self.script = script
        self.reports: list[dict[str, Any]] = []
        self.stderr_path = log_dir / f"{Path(script).stem}-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            ["node", str(HERE / script), json.dumps(args)],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, wanted: str | Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """The next report of kind `wanted` (or matching it); fails on the script's end, failure or silence."""
        match = (lambda r: r.get("kind") == wanted) if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(
                    f"{self.script}: no report matching {wanted!r} within {timeout:.0f}s; saw {self.reports[-5:]}\n{self.stderr()}"
                )
            if line is None:
                pytest.fail(
                    f"{self.script} ended (exit {self.proc.wait()}) before a report matching {wanted!r}; saw {self.reports[-5:]}\n{self.stderr()}"
                )
            try:
                report = json.loads(line)
            except ValueError:
                continue  # a stray line (a library's warning on stdout)
            self.reports.append(report)
            if report.get("kind") in ("failed", "timeout"):
                pytest.fail(f"{self.script}: {report}\n{self.stderr()}")
            if match(report):
                return report

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 40.0) -> Any:
        """The script's result; it then exits 0."""
        result = self.expect("result", timeout)["result"]
        assert self.proc.wait(timeout=10) == 0, self.stderr()
        return result

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM first: playwright closes its browser on it (a SIGKILL would orphan Chromium)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
