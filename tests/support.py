"""Test helpers: real processes (redis-server, `parley api`, `parley worker`) on loopback ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.adapters.redis.server import RedisServer, free_port, terminate

ROOT = Path(__file__).resolve().parent.parent
TENANTS = {"acme": "acme-key", "globex": "globex-key"}
API_KEYS = ",".join(f"{t}:{k}" for t, k in TENANTS.items())


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANTS[tenant]}"}


class ParleyProcess:
    """`parley api` or `parley worker` as a child process (kill() is SIGKILL, as a crash)."""

    def __init__(
        self, role: str, redis_url: str, log_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        """`args`: more command-line arguments (e.g. `--workers 2`)."""
        self.role = role
        self.args = args or []
        self.port = free_port() if role in ("api", "dev") else None
        self.redis_url = redis_url
        self.log_path = log_dir / f"{role}-{time.monotonic_ns()}.log"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "PARLEY_API_KEYS": API_KEYS,
            "PARLEY_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            # a fixed in-flight limit: tests that are not about overload must not have their concurrent requests
            # shed because this machine is noisy; tests/e2e/test_limits.py and P8 test the adaptive default
            "PARLEY_MIN_INFLIGHT": "64",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ParleyProcess:
        args = [sys.executable, "-m", "services.cli", self.role, *self.args]
        if self.port:
            args += ["--port", str(self.port)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if self.port:
            try:
                self._wait_http(timeout)
            except BaseException:
                self.kill()  # it did not come up: leave nothing running
                raise
        return self

    def _wait_http(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.role} did not come up: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it answers something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_ready(url: str, timeout: float = 20.0) -> None:
    """Start-up only: the API answers /ready once a projector has sent its first heartbeat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


__all__ = ["API_KEYS", "TENANTS", "ParleyProcess", "RedisServer", "auth", "free_port", "wait_for", "wait_ready"]
