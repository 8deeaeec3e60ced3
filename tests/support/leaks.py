"""The suite's secret-leak detector.

Every secret a test uses is either spelled with ``test-secret`` in it, or
registered here (IdP client secrets, passwords, seeds, keys, and every token a
test reads back from a Secret). Every log record produced anywhere in the suite
(captured at DEBUG, so nothing escapes by level), every exception a test fails
with, and (in operator tests) every Kubernetes Event and CR status is scanned for
them, raw and base64-encoded. A hit fails the test that produced it; the report
names where, never the value.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Iterable

PATTERN = re.compile(r"test-secret[\w.-]*")
_known: set[str] = set()
_lock = threading.Lock()


def register(*values: str | None) -> None:
    """Remember values that must never appear outside a Secret or a store."""
    with _lock:
        for value in values:
            if value and len(value) >= 6:
                _known.add(value)
                _known.add(base64.b64encode(value.encode()).decode().rstrip("="))


def find(text: str) -> list[str]:
    """Descriptions of the secrets found in ``text`` (kinds and lengths, not values)."""
    hits = [f"a test-secret value ({len(m)} chars)" for m in PATTERN.findall(text)]
    with _lock:
        known = list(_known)
    hits += [f"a registered secret ({len(v)} chars)" for v in known if v in text]
    return hits


class LeakWatch(logging.Handler):
    """Keeps the formatted text of every record since the last :meth:`take`."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._records: list[tuple[str, str]] = []
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record is not a leak
            return
        with _lock:
            self._records.append((record.name, text))

    def take(self) -> list[tuple[str, str]]:
        with _lock:
            records, self._records = self._records, []
        return records


def scan_records(records: Iterable[tuple[str, str]]) -> list[str]:
    problems = []
    for name, text in records:
        for hit in find(text):
            problems.append(f"log record of {name!r} contains {hit}")
    return problems
