"""Experiment: state Secrets not watched, one kopf event less per renewal.

State Secrets are written only by the operator, which updates its cache from its own writes:
watch only ``tokensync.dev/role in (target,source)``. The startup LIST still primes the cache
with every role. Not in the product: without the watch, a state Secret deleted by the garbage
collector or by a user stays in the cache (see ``configure_kopf``).

(kopf's diff base, once part of this experiment, is product code now: ``handlers.NoDiffBase``.)

Run with ``bench/run.py --operator-preload bench/experiments/kopf_lean.py``.
"""

from __future__ import annotations

from typing import Any

import kopf

import tokensync.handlers as handlers

_original = handlers.configure_kopf


def configure_kopf(settings: kopf.OperatorSettings, wiring: Any) -> None:
    _original(settings, wiring)
    settings.watching.label_selectors["v1", "secrets"] = "tokensync.dev/role in (target,source)"


handlers.configure_kopf = configure_kopf
print("bench experiment: state Secrets not watched", flush=True)
