"""Helpers shared by the bench processes: child processes, /proc readings, free ports.

Every child is started in its own session (process group) and registered in
:class:`Children`, which signals exactly those groups (by id) on exit: no orphan
survives a normal end, an exception or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
DRIVER_HEADER = "X-Bench-Driver"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all its threads) in seconds, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    user, system = cpu_times(pid)
    return user + system


def rss_bytes(pid: int) -> int:
    """VmRSS of one process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def system_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) / CLK_TCK for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Children:
    """Processes this run started; :meth:`stop_all` ends each one's process group.

    Every instance is also stopped at interpreter exit, as a safety net.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []
        atexit.register(self.stop_all)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log: IO[bytes] = log_path.open("wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, signalled by id
                env={**os.environ, **(env or {})},
                cwd=ROOT,
            )
        finally:
            log.close()
        child = Child(name, proc, log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, *, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the child's process group, wait, then SIGKILL the group if it lingers."""
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, sig)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(5)
            # Whatever the group leader left behind (e.g. the curl of a baseline loop).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)
        return child.proc.returncode

    def stop_all(self) -> None:
        for child in reversed(list(self._children)):
            self.stop(child, timeout=10.0)


def wait_for_line(child: Child, prefix: str, timeout: float = 60.0) -> str:
    """The first log line of ``child`` that starts with ``prefix`` (e.g. ``READY``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.log_path.exists():
            for line in child.log_path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not print {prefix!r} within {timeout}s:\n{child.log_tail()}")


def python() -> str:
    return sys.executable
