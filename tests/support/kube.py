"""Helpers for tests against the Kubernetes API emulator (tokensync.devkit.kube).

The `kube` / `kube_api` fixtures in tests/conftest.py build on these.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import kopf
from kopf.testing import KopfRunner

from tokensync.devkit.kube import RunningCluster

T = TypeVar("T")

PROJECT_CRDS = Path(__file__).resolve().parents[2] / "crds"


def make_crd(
    group: str,
    plural: str,
    kind: str,
    *,
    version: str = "v1",
    namespaced: bool = True,
    status: bool = True,
) -> dict[str, Any]:
    """A minimal CustomResourceDefinition (schema-less), with or without the status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced" if namespaced else "Cluster",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}} if status else {},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


# kopf's own example resource, as in kopf's docs and tests.
KOPFEXAMPLES_CRD = make_crd("kopf.dev", "kopfexamples", "KopfExample")


def kopf_settings(prefix: str = "tokensync.dev") -> kopf.OperatorSettings:
    """Settings for a short-lived kopf run against the emulator, with tokensync's bookkeeping names."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.persistence.finalizer = f"{prefix}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 10  # the emulator honours timeoutSeconds
    settings.networking.request_timeout = 10
    return settings


@contextmanager
def preserved_logging() -> Iterator[None]:
    """Undo what `kopf run` does to the process's logging (root level & handlers, `asyncio`).

    Otherwise later tests see DEBUG records from everywhere in `caplog`, and a handler that
    writes to KopfRunner's closed output stream.
    """
    loggers = [logging.getLogger(), logging.getLogger("asyncio")]
    saved = [(logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


@contextmanager
def kopf_running(
    registry: kopf.OperatorRegistry,
    settings: kopf.OperatorSettings | None = None,
    args: Sequence[str] = ("--all-namespaces", "--verbose"),
) -> Iterator[KopfRunner]:
    """`kopf run --standalone` with these handlers in a thread, logging restored afterwards.

    Log kopf in first: `kube.login_kopf(registry)`. The output is in `runner.output` on exit.
    """
    settings = settings if settings is not None else kopf_settings()
    with (
        preserved_logging(),
        KopfRunner(["run", "--standalone", *args], registry=registry, settings=settings, timeout=30) as runner,
    ):
        yield runner


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `probe` until it returns something truthy; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"Not reached in {timeout} s; the last probe gave {result!r}")
        time.sleep(interval)


def get_json(cluster: RunningCluster, path: str) -> Any:
    """GET a raw API path (discovery, etc.) without the client's models in the way."""
    with urllib.request.urlopen(cluster.url + path, timeout=10) as response:
        return json.load(response)


def stream_json(cluster: RunningCluster, path: str) -> Iterator[dict[str, Any]]:
    """The JSON lines of a raw watch stream, until the server ends it (pass timeoutSeconds)."""
    with urllib.request.urlopen(cluster.url + path, timeout=30) as response:
        for line in response:
            if line.strip():
                yield json.loads(line)
