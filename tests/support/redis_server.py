"""
A real ``redis-server`` for the tests, on a free loopback port, with nothing on disk.

Real rather than faked because the Redis store's promises are about Redis itself
(``SET ... EX`` leaves a TTL that ``TTL`` reports; a stopped server is a connection
error), and a fake would only test our idea of Redis.

``stop()`` / ``start()`` keep the port, so that a test can take the server away
under a client and bring it back at the same address; ``kill()`` does it with
SIGKILL (a crash: no clean shutdown). ``persistent=True`` keeps the data across
both in an append-only file fsynced on every write, as a Redis that holds
credentials should be configured; the default keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisServer", "find_redis_server", "free_port"]

ENSURE_HINT = "redis-server is not on PATH: run `bash scripts/ensure-redis` (it installs the Debian package)."


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    # Racy in theory (the port is free when we look, not necessarily when redis binds),
    # good enough in practice on a test machine; start() fails loudly if it loses.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, executable: str, directory: Path, *, port: int | None = None, persistent: bool = False) -> None:
        self.executable = executable
        self.persistent = persistent
        self.directory = directory
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{self._log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s:\n{self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-command if one is running. ``start()`` brings it back."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(10)

    def ping(self) -> bool:
        # A raw RESP PING: no client library, so no client-side retries or pools in the way.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        return "(no log)"
