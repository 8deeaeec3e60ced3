"""Thin kopf handlers: kopf watches, the controller decides.

Only raw event handlers (``@kopf.on.event``) are used, never ``on.create`` /
``on.update``: those make kopf write progress and diff-base annotations and a
finalizer onto every resource, which costs API writes per object, shows up as
drift in GitOps tools, and blocks deletion when the operator is gone. tokensync
needs none of it: the status subresource records what was handled
(``observedGeneration``, ``handledRefreshRequest``), and owner references let the
API server's garbage collector clean up, operator or not.

State lives in ``memo`` (one :class:`~tokensync.controller.Controller`, its Kubernetes
client, the scheduler task), built in ``on.startup`` and torn down in
``on.cleanup``. The caller (``tokensync run``, the demo, tests) puts a
:class:`Wiring` in ``memo.wiring`` to say how to reach the cluster and Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import kopf

from tokensync.controller import Controller, KubeClient, bearer_header, load_configuration, redis_store_factory
from tokensync.controller.secrets import ROLE_LABEL
from tokensync.models.credential import GROUP, PLURAL, VERSION
from tokensync.models.settings import OperatorSettings

__all__ = ["REGISTRY", "Wiring", "configure_kopf"]

logger = logging.getLogger("tokensync.handlers")

#: tokensync's own registry: handlers that other code adds to kopf's default
#: registry (a login handler of a test, an embedding application's handlers)
#: never run inside the operator, and ours never run inside theirs.
REGISTRY = kopf.OperatorRegistry()


@dataclass
class Wiring:
    """How the operator reaches the world; tests and the demo swap parts of it."""

    settings: OperatorSettings = field(default_factory=OperatorSettings)
    #: A loaded ``kubernetes.client.Configuration``; kopf and tokensync's own client
    #: both use it, so ``--kubeconfig`` means the same cluster for both.
    configuration: Any = None
    #: For API emulators: a plain URL instead of kubeconfig / in-cluster credentials.
    server_url: str | None = None
    #: Called with the controller once it exists (the demo's live table, tests).
    on_controller: Callable[[Controller], None] | None = None


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf's ``old``/``new``/``diff`` stay empty.

    For every watch event kopf builds the object's "essence" (a deep copy of its body)
    and diffs it against the last handled one, for change handlers (``on.update``...).
    tokensync has only raw ``on.event`` handlers (see the module docstring), which never
    read the diff, and three events echo each refresh. Together with
    :func:`quiet_hot_path_loggers`: 6.5 -> 5.4 ms CPU per refresh (bench/, S2). Adding a change handler would need
    :class:`kopf.AnnotationsDiffBaseStorage` back (tests/unit/test_manifests.py asserts
    there is none).
    """

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        return {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


#: Loggers that write one INFO line per refresh or per watch event. ``kopf.objects``:
#: "Handler 'tokensync-secret' succeeded." for each of the three events that echo a
#: refresh's own writes. ``httpx``: one line per token request, which the
#: ``tokensync.auth`` line "token issued by ... (expires in ...)" already says. Their
#: warnings and errors (failed handlers, ...) still show.
HOT_PATH_LOGGERS = ("kopf.objects", "httpx")


def quiet_hot_path_loggers() -> list[logging.Logger]:
    """Raise the loggers of :data:`HOT_PATH_LOGGERS` to WARNING, if logging is at INFO and
    nobody set their level: ``--log-level debug`` (or an embedder's own setting) keeps
    every line. Four lines per refresh are not formatted and written (see :class:`NoDiffBase`
    for the measured gain). Returns
    the loggers changed, for :func:`cleanup` to put back."""
    changed = []
    for name in HOT_PATH_LOGGERS:
        log = logging.getLogger(name)
        if log.level == logging.NOTSET and log.getEffectiveLevel() == logging.INFO:
            log.setLevel(logging.WARNING)
            changed.append(log)
    return changed


def configure_kopf(settings: kopf.OperatorSettings, wiring: Wiring) -> None:
    """Kopf settings, each chosen on purpose (see docs/operations in the README)."""
    # Kopf's own bookkeeping, should anything ever use it, under our prefix.
    settings.persistence.finalizer = "tokensync.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tokensync.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    # Watch only the Secrets tokensync writes or users opted in: server-side,
    # so the operator never receives, let alone caches, the cluster's other Secrets.
    # State Secrets stay watched although only tokensync writes them (one echo event per
    # refresh, bench/experiments/kopf_lean.py): their watch is what drops a deleted state
    # Secret from the cache (garbage-collected with its credential, or deleted by a user to
    # force a new grant) and bounds the cache to what exists.
    settings.watching.label_selectors["v1", "secrets"] = ROLE_LABEL
    # Silent watch stalls are real (proxies, load balancers); reconnect regularly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # Handler errors are logged, not posted: tokensync posts its own, sanitised Events.
    settings.posting.enabled = False
    # With a namespace list, serve exactly those namespaces and the resources that
    # exist at start: the dynamic scan would need cluster-wide list/watch on
    # namespaces and CRDs, which a namespaced installation does not grant (kopf
    # then retries the 403s for about a minute before serving anything).
    if wiring.settings.namespaces:
        settings.scanning.disabled = True
    settings.networking.error_backoffs = [1, 2, 5, 10, 20, 30]


@kopf.on.login(id="tokensync-login", registry=REGISTRY)
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    wiring: Wiring = memo.get("wiring") or Wiring()
    if wiring.server_url is not None:
        return kopf.ConnectionInfo(server=wiring.server_url, insecure=True, scheme="Bearer", token="tokensync")
    if wiring.configuration is None:
        return kopf.login_via_client(**kwargs)
    configuration = wiring.configuration
    # The token is read again at each login: kopf logs in again after a 401, and
    # in-cluster service-account tokens rotate on disk.
    scheme, _, token = (bearer_header(configuration) or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
        scheme=scheme or None,
        token=token or None,
    )


@kopf.on.startup(id="tokensync-startup", registry=REGISTRY)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    wiring: Wiring = memo.get("wiring") or Wiring()
    memo["wiring"] = wiring
    configure_kopf(settings, wiring)
    memo["quieted_loggers"] = quiet_hot_path_loggers()
    if wiring.server_url is not None:
        kube = KubeClient.for_url(wiring.server_url)
    else:
        configuration = wiring.configuration or await asyncio.to_thread(load_configuration)
        kube = KubeClient.from_configuration(configuration)
    controller = Controller(
        kube=kube,
        settings=wiring.settings,
        redis_store_factory=redis_store_factory(wiring.settings),
    )
    if wiring.settings.metrics_port:
        from prometheus_client import start_http_server

        # Before anything starts: a port in use is a configuration error that must stop
        # the operator with a message, not leave kopf retrying this activity forever
        # (which looked like a silent hang: nothing watched, nothing Ready).
        try:
            server, _thread = start_http_server(
                wiring.settings.metrics_port, addr=wiring.settings.metrics_address, registry=controller.metrics.registry
            )
        except OSError as exc:
            where = f"{wiring.settings.metrics_address}:{wiring.settings.metrics_port}"
            raise kopf.PermanentError(
                f"cannot serve metrics on {where}: {exc.strerror or exc}; "
                "choose another port with --metrics-port / TOKENSYNC_METRICS_PORT (0 disables metrics)"
            ) from None
        memo["metrics_server"] = server
    await controller.start()
    memo["controller"] = controller
    memo["scheduler"] = asyncio.get_running_loop().create_task(controller.run(), name="tokensync-scheduler")
    if wiring.on_controller is not None:
        wiring.on_controller(controller)
    logger.info("tokensync started: %d managed Secrets known", len(controller.secrets))


@kopf.on.cleanup(id="tokensync-cleanup", registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task: asyncio.Task[None] | None = memo.get("scheduler")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    server = memo.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.close()
        await controller.kube.close()
    for log in memo.get("quieted_loggers") or ():  # an embedding process gets its logging back
        log.setLevel(logging.NOTSET)


@kopf.on.event(GROUP, VERSION, PLURAL, id="tokensync-credential", registry=REGISTRY)
async def credential_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        controller.observe(dict(event["object"]), event.get("type"))


@kopf.on.event("v1", "secrets", id="tokensync-secret", registry=REGISTRY)
async def secret_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        controller.observe_secret(dict(event["object"]), event.get("type"))


@kopf.on.probe(id="credentials", registry=REGISTRY)
def probe(memo: kopf.Memo, **_: Any) -> int:
    controller: Controller | None = memo.get("controller")
    return len(controller.entries) if controller is not None else 0
