"""The unmodified operator as its own process, forked from a pre-imported parent.

``python tests/faults/operator_process.py`` is a "zygote": it imports the operator
(kopf, the kubernetes client, httpx, redis: about a second of CPU) once, then reads
one JSON command per line on stdin and answers one JSON line on stdout:

* ``{"log": FILE, "server_url": URL, "settings": {...}}`` forks a child that runs
  :func:`tokensync.cli.run_operator` exactly as ``tokensync run`` does (same logging
  format, settings from ``OperatorSettings``) against the API server at URL, with its
  stdout and stderr in FILE; the answer is ``{"pid": N}``.

The child is a real, separate operator process: the fault tests SIGKILL it by pid
and start the next one, dozens of times, without paying the import on every
restart. The zygote stays single-threaded so that forking is safe; children are
reaped automatically (``SIGCHLD`` ignored) and die with the zygote
(``PR_SET_PDEATHSIG``), which exits when its stdin closes (pytest gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import sys
import threading
from typing import Any

import httpx  # noqa: F401  (pre-imported for the children)
import kopf  # noqa: F401
import kubernetes  # noqa: F401
import redis  # noqa: F401

import tokensync.controller
import tokensync.stores.redis  # noqa: F401
from tokensync.cli import run_operator
from tokensync.handlers import Wiring
from tokensync.models.settings import OperatorSettings

_PR_SET_PDEATHSIG = 1


def _child(command: dict[str, Any]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    random.seed()
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    # As `tokensync run --log-level info` (cli._setup_logging), plus tokensync's own DEBUG
    # records, so that the leak scan of this log sees everything tokensync says.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("tokensync").setLevel(logging.DEBUG)
    settings = OperatorSettings(**command["settings"])
    wiring = Wiring(settings=settings, server_url=command["server_url"])
    asyncio.run(run_operator(wiring, liveness=None))


def main() -> int:
    assert threading.active_count() == 1, "the zygote must not fork with threads running"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(command)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
