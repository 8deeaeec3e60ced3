"""``python -m tokensync.devkit.idp``: run the identity provider as a process.

The contract with a parent (the test fixtures): once serving, exactly one line
``READY http://127.0.0.1:PORT`` goes to stdout; nothing secret ever does. The admin
token is in ``<state-dir>/admin-token`` (0600). SIGTERM or SIGINT stop it cleanly
(exit 0); with ``--exit-on-stdin-eof`` so does the parent's death, because the
parent's end of the stdin pipe closes with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tokensync.devkit.idp.config import IdpConfig
from tokensync.devkit.idp.server import start_idp


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokensync.devkit.idp", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--config", type=Path, help="IdpConfig as JSON (default: no clients, no users)")
    parser.add_argument("--state-dir", type=Path, help="database, keys, admin token (default: a temp dir)")
    parser.add_argument("--access-token-lifetime", type=int, help="seconds; overrides the config file")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = IdpConfig.from_json(args.config.read_bytes()) if args.config else IdpConfig()
    if args.access_token_lifetime is not None:
        config = config.with_changes(access_token_lifetime=args.access_token_lifetime)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    running = start_idp(config, port=args.port, state_dir=args.state_dir)
    try:
        if args.exit_on_stdin_eof:
            threading.Thread(target=_wait_for_eof, args=(stop,), name="stdin-eof", daemon=True).start()
        print(f"READY {running.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        running.stop()
    return 0


def _wait_for_eof(stop: threading.Event) -> None:
    # os.read, not sys.stdin: a daemon thread blocked inside the buffered reader holds
    # its lock, and interpreter shutdown then aborts trying to take it.
    fd = sys.stdin.fileno()
    while os.read(fd, 4096):
        pass
    stop.set()


if __name__ == "__main__":
    sys.exit(main())
