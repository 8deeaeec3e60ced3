"""Experiment: no INFO line per HTTP request (httpx) and per handled watch event (kopf.objects).

Run with ``bench/run.py --operator-preload bench/experiments/quiet_logs.py``.
"""

from __future__ import annotations

import logging

logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("kopf.objects").setLevel(logging.WARNING)
print("bench experiment: httpx and kopf.objects INFO lines off", flush=True)
