"""Every experiment of this folder at once: ``--operator-preload bench/experiments/all.py``."""

from __future__ import annotations

import runpy
from pathlib import Path

for name in ("kopf_lean.py",):
    runpy.run_path(str(Path(__file__).with_name(name)), run_name="bench_experiment")
