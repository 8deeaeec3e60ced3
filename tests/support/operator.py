"""Run the real operator (kopf machinery, tokensync's handlers) in a background thread.

The thread has its own event loop, so tests can use the synchronous `kubernetes`
client against the emulator and poll, exactly like a user with kubectl would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client

from support import leaks
from tokensync.cli import run_operator
from tokensync.controller import Controller
from tokensync.handlers import Wiring
from tokensync.models.settings import OperatorSettings

GROUP, VERSION, PLURAL = "tokensync.dev", "v1alpha1", "oauthcredentials"


@dataclass
class OperatorHandle:
    controller: Controller
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    errors: list[BaseException] = field(default_factory=list)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def running_operator(url: str, *, settings: OperatorSettings | None = None) -> Iterator[OperatorHandle]:
    stop = threading.Event()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def on_controller(controller: Controller) -> None:
        holder["controller"] = controller
        holder["loop"] = asyncio.get_running_loop()
        ready.set()

    wiring = Wiring(
        settings=settings or OperatorSettings(backoff_initial=0.5, backoff_max=5, metrics_port=0),
        server_url=url,
        on_controller=on_controller,
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(run_operator(wiring, liveness=None, stop=stop))
        except BaseException as exc:  # surfaced by the handle
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="tokensync-operator", daemon=True)
    thread.start()
    if not ready.wait(30) or errors:
        stop.set()
        raise RuntimeError(f"the operator did not start: {errors!r}")
    handle = OperatorHandle(holder["controller"], thread, holder["loop"], errors)
    try:
        yield handle
    finally:
        stop.set()
        thread.join(30)


def eventually(probe: Callable[[], Any], timeout: float, interval: float = 0.2) -> bool:
    """Whether ``probe()`` turns true within ``timeout`` seconds: for checks counted, not raised."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_until(probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s: {what} (last: {last!r})")


class Cluster:
    """kubectl-like helpers over the official client."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str = "default") -> None:
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.namespace = namespace

    def apply_secret(self, name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> None:
        body = {
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels or {}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        try:
            current = self.core.read_namespaced_secret(name, self.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_secret(self.namespace, body)
        else:
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            self.core.replace_namespaced_secret(name, self.namespace, body)

    def secret(self, name: str) -> dict[str, Any] | None:
        try:
            body = self.core.read_namespaced_secret(name, self.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self.core.api_client.sanitize_for_serialization(body)  # type: ignore[no-any-return]

    def secret_data(self, name: str) -> dict[str, str] | None:
        body = self.secret(name)
        if body is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}
        # Tokens belong in Secrets, nowhere else (expiry and type are public facts).
        leaks.register(*(v for k, v in data.items() if k not in ("token_type", "expires_at")))
        return data

    def apply_credential(self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OAuthCredential",
            "metadata": {"name": name, "namespace": self.namespace, "annotations": annotations or {}},
            "spec": spec,
        }
        try:
            current = self.credential(name)
        except kubernetes.client.ApiException:
            current = None
        if current is None:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        else:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.custom.replace_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, body)

    def credential(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def delete_credential(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, kind: str = "Ready") -> dict[str, Any] | None:
        body = self.credential(name) or {}
        for condition in (body.get("status") or {}).get("conditions") or []:
            if condition.get("type") == kind:
                return condition  # type: ignore[no-any-return]
        return None

    def leak_report(self) -> list[str]:
        """Secrets found in any credential's status or any Event of the namespace."""
        problems = []
        credentials = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        for item in credentials.get("items", []):
            for hit in leaks.find(str(item.get("status")) + str(item.get("metadata", {}).get("annotations"))):
                problems.append(f"OAuthCredential {item['metadata']['name']} status/annotations contain {hit}")
        for event in self.core.list_namespaced_event(self.namespace).items:
            for hit in leaks.find(f"{event.reason} {event.message}"):
                problems.append(f"Event {event.reason} contains {hit}")
        return problems

    def ready(self, name: str) -> bool:
        condition = self.condition(name)
        return condition is not None and condition.get("status") == "True"

    def apply_until_ready(self, specs: dict[str, dict[str, Any]], timeout: float = 30) -> None:
        """Apply every credential of ``specs`` (name -> spec), then wait until all are Ready."""
        for name, spec in specs.items():
            self.apply_credential(name, spec)
        wait_until(lambda: all(self.ready(n) for n in specs), timeout=timeout, what="all Ready")
