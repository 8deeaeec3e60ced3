"""Every experiment of this folder at once: ``--operator-preload bench/experiments/all.py``.

Add ``--operator-env PYTHONPATH=DIR`` with ``pip install --target DIR sniffio`` to also try the
missing ``sniffio`` dependency (httpcore imports it on every request and fails without it).
"""

from __future__ import annotations

import runpy
from pathlib import Path

for name in ("kube_aiohttp.py", "quiet_logs.py", "kopf_lean.py"):
    runpy.run_path(str(Path(__file__).with_name(name)), run_name="bench_experiment")
