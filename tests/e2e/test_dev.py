"""`parley dev`, the README's first command: it starts its own redis-server, serves the API with a worker in the
same process (a chat is answered by the offline model), and stops cleanly on SIGTERM or Ctrl-C: exit 0 (130 for
Ctrl-C), no traceback, and its redis-server stopped with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.adapters.redis.server import free_port
from tests.support import ROOT, wait_ready

DEMO = {"Authorization": "Bearer demo-key"}


def _redis_servers_under(path: Path) -> list[int]:
    """pids of redis-servers whose working directory is below `path`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() == "redis-server" and str(path) in os.readlink(proc / "cwd"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_parley_dev_serves_a_chat_and_stops_cleanly(tmp_path: Path, stop: signal.Signals, code: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") and k != "REDIS_URL"}
    env |= {"PYTHONPATH": str(ROOT), "PARLEY_DATA_DIR": str(tmp_path / ".parley")}
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "dev", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=60)
        assert _redis_servers_under(tmp_path), "parley dev runs its own redis-server under its data directory"
        with httpx.Client(base_url=url, headers=DEMO, timeout=30) as c:
            sid = c.post("/sessions", json={}).json()["id"]
            answer = c.post(f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "hello"}]})
            assert answer.status_code == 200, answer.text
            assert "hello" in answer.json()["choices"][0]["message"]["content"]
        proc.send_signal(stop)
        assert proc.wait(30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert _redis_servers_under(tmp_path) == [], "its redis-server stopped with it"
