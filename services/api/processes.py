"""`parley api --workers N`: N API processes on one listening socket, kept running by this parent.

The parent binds the socket and hands it to each child (`parley api --fd`), as uvicorn and gunicorn do; the
kernel spreads connections over the processes. Each child is a whole `parley api` (its own event loop, Redis
pools, caches and in-flight limit), so N processes use up to N cores. A child that exits (status 70 after a part
failed for good, or a crash) is started again, with backoff if it keeps dying young; SIGTERM or SIGINT stops them
all gracefully.

Metrics: every child writes its values to `PROMETHEUS_MULTIPROC_DIR` (a private temporary folder unless set;
emptied at start), and any child answers `GET /metrics` with the sum over all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["serve_many"]

log = logging.getLogger("parley.api")

STOP_GRACE_S = 30.0
"""How long children may take to finish their requests after SIGTERM before they are killed."""


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _metrics_dir() -> tuple[Path, bool]:
    """The multiprocess folder (and whether it is ours to delete), emptied of an earlier run's values."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return Path(tempfile.mkdtemp(prefix="parley-metrics-")), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    return path, False


def serve_many(host: str, port: int, workers: int) -> int:
    """Run `workers` API processes until SIGTERM/SIGINT; answers the exit status."""
    sock = _listen(host, port)
    metrics_dir, own_dir = _metrics_dir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    args = [
        sys.executable,
        "-m",
        "services.cli",
        "api",
        "--host",
        host,
        "--port",
        str(port),
        "--fd",
        str(sock.fileno()),
    ]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, env=env, pass_fds=(sock.fileno(),))

    stopping = False

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = [start() for _ in range(workers)]
    started = [time.monotonic()] * workers
    backoff = [0.5] * workers
    due: list[float | None] = [None] * workers
    """When a dead child's successor is to start (None: the child runs)."""
    log.info("Parley on http://%s:%d with %d API processes (metrics merged in %s)", host, port, workers, metrics_dir)
    try:
        while not stopping:
            time.sleep(0.1)
            now = time.monotonic()
            for i, child in enumerate(children):
                when = due[i]
                if when is not None:
                    if now >= when:
                        children[i], started[i], due[i] = start(), now, None
                    continue
                if child.poll() is None:
                    continue
                _forget(child.pid, metrics_dir)
                backoff[i] = 0.5 if now - started[i] > 10 else min(backoff[i] * 2, 30.0)
                log.error(
                    "API process %d exited with status %s; starting another in %.1fs",
                    child.pid,
                    child.returncode,
                    backoff[i],
                )
                due[i] = now + backoff[i]
    finally:
        alive = [c for i, c in enumerate(children) if due[i] is None and c.poll() is None]
        for child in alive:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in alive:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        sock.close()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _forget(pid: int, metrics_dir: Path) -> None:
    """A dead child's live gauges must not be summed any more (its counters and histograms stay: they are totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
