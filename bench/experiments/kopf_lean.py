"""Experiment: less kopf work per watch event.

* tokensync has only raw ``on.event`` handlers, so kopf's per-event "essence" (a deep copy of
  every body, to diff it for change handlers) is never used: build none.
* State Secrets are written only by the operator, which updates its cache from its own
  writes: do not watch them (``tokensync.dev/role in (target,source)``), one event less per
  renewal. The startup LIST still primes the cache with every role.

Run with ``bench/run.py --operator-preload bench/experiments/kopf_lean.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

import tokensync.handlers as handlers

_original = handlers.configure_kopf


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    def build(self, *, body: Any, extra_fields: Iterable[Any] | None = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None


def configure_kopf(settings: kopf.OperatorSettings, wiring: Any) -> None:
    _original(settings, wiring)
    settings.persistence.diffbase_storage = NoDiffBase(prefix="tokensync.dev", key="last-handled-configuration")
    settings.watching.label_selectors["v1", "secrets"] = "tokensync.dev/role in (target,source)"


handlers.configure_kopf = configure_kopf
print("bench experiment: no kopf diff base, state Secrets not watched", flush=True)
