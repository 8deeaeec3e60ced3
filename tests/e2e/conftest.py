"""End-to-end tests against a real Kubernetes cluster, driven with kubectl.

They run only when ``TOKENSYNC_E2E_KUBECONFIG`` names a kubeconfig (of a throwaway
cluster: kind, k3d, minikube...); otherwise every test here is skipped. When it is
set, a missing ``kubectl`` is an error, not a skip: you asked for the real thing.

What is installed, and how the operator runs:

* ``kubectl apply -f crds/`` and the RBAC of ``manifests/`` - the very files the
  kustomize install uses (Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding).
  The Deployment is not applied (the image is not built here): instead the operator
  runs on this machine as a subprocess, authenticated as the ``tokensync``
  ServiceAccount through a token from ``kubectl create token``, so it has exactly the
  shipped permissions, and it reaches the test IdP on 127.0.0.1.
* It runs with ``-A``, as the shipped Deployment does (so the cluster must not run
  another tokensync; the tests check). ``TOKENSYNC_E2E_WATCH=namespace`` runs it with
  ``--namespace <test namespace>`` instead: the shipped ClusterRole does not grant
  listing namespaces (``-A`` never does), so kopf retries that 403 with the
  operator's error backoffs for about 70 s before falling back to the named
  namespace; the fixture waits for that fallback before any test starts.
* Objects that did not exist before are deleted afterwards (``TOKENSYNC_E2E_KEEP=1``
  keeps everything for a post-mortem); the test namespace always goes.

Knobs (environment):

* ``TOKENSYNC_E2E_KUBECONFIG``   the cluster (required to run at all)
* ``TOKENSYNC_E2E_KUBECTL``      kubectl binary (default: ``kubectl`` on PATH)
* ``TOKENSYNC_E2E_SOAK_SECONDS`` how long to watch tokens being renewed (default 90;
  600 for the ten-minute soak)
* ``TOKENSYNC_E2E_TOKEN_LIFETIME`` access token lifetime at the IdP (default 30 s)
* ``TOKENSYNC_E2E_WAIT_SECONDS`` readiness / garbage-collection waits (default 60)
* ``TOKENSYNC_E2E_WATCH``        ``all`` (default, ``-A``) or ``namespace`` (``--namespace``)
* ``TOKENSYNC_E2E_KEEP``         1: leave the namespace and installed objects behind
* ``TOKENSYNC_E2E_KILLS``        operator SIGKILLs in test_e2e_faults.py (default 20; each costs
  an operator start, ~1-2 s, plus the wait for a token request to kill it at)

On a failure, the report carries the operator's log tail and the state of the
test namespace (``kubectl get oauthcredential -o yaml``, Secret names, Events);
never a Secret's data.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support.idp import IdpProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

E2E_KUBECONFIG = os.environ.get("TOKENSYNC_E2E_KUBECONFIG", "")
SKIP_REASON = "TOKENSYNC_E2E_KUBECONFIG not set: no real cluster"


def _knob(name: str, default: float, parse: type[float] | type[int], unit: str) -> Any:
    raw = os.environ.get(name, "") if E2E_KUBECONFIG else ""  # a stray knob must not break other tests
    try:
        value = parse(raw) if raw else default
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} is not {unit}") from None
    if value <= 0:
        raise pytest.UsageError(f"{name} must be positive")
    return value


def _seconds(name: str, default: float) -> float:
    return float(_knob(name, default, float, "a number of seconds"))


def _count(name: str, default: int) -> int:
    return int(_knob(name, default, int, "a whole number"))


SOAK_SECONDS = _seconds("TOKENSYNC_E2E_SOAK_SECONDS", 90)
TOKEN_LIFETIME = int(_seconds("TOKENSYNC_E2E_TOKEN_LIFETIME", 30))
WAIT_SECONDS = _seconds("TOKENSYNC_E2E_WAIT_SECONDS", 60)
KEEP = os.environ.get("TOKENSYNC_E2E_KEEP", "") == "1"
KILLS = _count("TOKENSYNC_E2E_KILLS", 20)
WATCH = os.environ.get("TOKENSYNC_E2E_WATCH", "all") if E2E_KUBECONFIG else "all"
if WATCH not in ("all", "namespace"):
    raise pytest.UsageError(f"TOKENSYNC_E2E_WATCH={WATCH!r}: use all or namespace")
# kopf's fallback after the namespaces LIST is denied: 1+2+5+10+20+30 s of retries.
NAMESPACE_FALLBACK_LOG = "Not enough permissions to list namespaces"
NAMESPACE_FALLBACK_SECONDS = 120.0
# One generous budget per test (pytest-timeout counts the session fixtures' setup
# against the first test): cluster round trips, the operator start, the soak, the kills.
TEST_TIMEOUT = int(SOAK_SECONDS + 6 * WAIT_SECONDS + 420 + 12 * KILLS)

OPERATOR_NAMESPACE = "tokensync-system"
CRD_NAME = "oauthcredentials.tokensync.dev"
# The RBAC the kustomize base installs (manifests/kustomization.yaml), file by file.
RBAC_FILES = (
    ROOT / "manifests" / "operator" / "namespace.yaml",
    ROOT / "manifests" / "operator" / "serviceaccount.yaml",
    ROOT / "manifests" / "rbac" / "clusterrole.yaml",
    ROOT / "manifests" / "rbac" / "clusterrolebinding.yaml",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(item.path).parents:
            continue  # this hook sees the whole session's items
        item.add_marker(pytest.mark.e2e)
        item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))
        if not E2E_KUBECONFIG:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and HERE in Path(item.path).parents:
        cluster = getattr(item, "funcargs", {}).get("cluster")
        if isinstance(cluster, Cluster):
            report.sections.append(("tokensync e2e diagnostics", cluster.diagnostics()))


# -- kubectl ----------------------------------------------------------------------------------


class KubectlError(Exception):
    pass


@dataclass
class Kubectl:
    """kubectl against one kubeconfig. Secret values only ever travel on stdin, never in argv."""

    binary: str
    kubeconfig: str

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        command = [self.binary, "--kubeconfig", self.kubeconfig, *args]
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise KubectlError(f"kubectl {' '.join(args)}: no answer within {timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, *docs: dict[str, Any], namespace: str | None = None) -> None:
        scope = ["-n", namespace] if namespace else []
        self.run("apply", *scope, "-f", "-", stdin=yaml.safe_dump_all(docs))

    def exists(self, kind: str, name: str, namespace: str | None = None) -> bool:
        scope = ["-n", namespace] if namespace else []
        return bool(self.run("get", kind, name, *scope, "--ignore-not-found", "-o", "name").stdout.strip())

    def can_i(self, verb: str, resource: str, namespace: str | None = None, subresource: str | None = None) -> bool:
        args = ["auth", "can-i", verb, resource]
        args += ["-n", namespace] if namespace else ["--all-namespaces"]  # cluster scope
        args += [f"--subresource={subresource}"] if subresource else []
        result = self.run(*args, check=False)
        answer = result.stdout.strip()
        if answer not in ("yes", "no"):
            raise KubectlError(f"kubectl {' '.join(args)}: {result.stderr.strip() or answer!r}")
        return answer == "yes"


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    """kubectl with the admin kubeconfig of TOKENSYNC_E2E_KUBECONFIG; fails loudly if it cannot work."""
    kubeconfig = Path(E2E_KUBECONFIG).expanduser()
    if not kubeconfig.is_file():
        pytest.fail(f"TOKENSYNC_E2E_KUBECONFIG={E2E_KUBECONFIG!r}: no such file", pytrace=False)
    binary = os.environ.get("TOKENSYNC_E2E_KUBECTL") or shutil.which("kubectl")
    if not binary:
        pytest.fail(
            "TOKENSYNC_E2E_KUBECONFIG is set but there is no kubectl on PATH (or in TOKENSYNC_E2E_KUBECTL): "
            "the e2e tests drive the cluster with kubectl",
            pytrace=False,
        )
    client = Kubectl(binary, str(kubeconfig))
    try:
        client.run("version", "-o", "json", timeout=30)
    except KubectlError as exc:
        pytest.fail(f"cannot reach the cluster of {kubeconfig}: {exc}", pytrace=False)
    return client


# -- what the operator needs in the cluster ----------------------------------------------------------


@pytest.fixture(scope="session")
def installed(kubectl: Kubectl) -> Iterator[None]:
    """The CRD (crds/) and the shipped RBAC; afterwards, deletes what was not there before."""
    if kubectl.exists("deployment", "tokensync", OPERATOR_NAMESPACE):
        pytest.fail(
            f"a tokensync Deployment already runs in {OPERATOR_NAMESPACE}: it would reconcile the test's "
            "credentials too. Use a cluster without tokensync installed.",
            pytrace=False,
        )
    objects = [
        ("customresourcedefinition", CRD_NAME, None),
        ("namespace", OPERATOR_NAMESPACE, None),
        ("serviceaccount", "tokensync", OPERATOR_NAMESPACE),
        ("clusterrole", "tokensync", None),
        ("clusterrolebinding", "tokensync", None),
    ]
    created = [obj for obj in objects if not kubectl.exists(*obj)]
    try:
        kubectl.run("apply", "-f", str(ROOT / "crds"))
        kubectl.run(
            "wait",
            "--for=condition=Established",
            f"customresourcedefinition/{CRD_NAME}",
            f"--timeout={WAIT_SECONDS:.0f}s",
        )
        kubectl.run("apply", *(arg for path in RBAC_FILES for arg in ("-f", str(path))))
        yield
    finally:
        if not KEEP:
            for kind, name, namespace in reversed(created):
                scope = ["-n", namespace] if namespace else []
                result = kubectl.run(
                    "delete", kind, name, *scope, "--ignore-not-found", "--wait=false", check=False, timeout=60
                )
                if result.returncode != 0:
                    print(f"e2e cleanup: could not delete {kind}/{name}: {result.stderr.strip()}", file=sys.stderr)


@pytest.fixture(scope="session")
def namespace(kubectl: Kubectl, installed: None) -> Iterator[str]:
    """A fresh namespace for the test's credentials, deleted at the end (unless TOKENSYNC_E2E_KEEP=1)."""
    name = f"tokensync-e2e-{uuid.uuid4().hex[:8]}"
    kubectl.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"tokensync.dev/e2e": "true"}}}
    )
    try:
        yield name
    finally:
        if KEEP:
            print(f"e2e: kept namespace {name}", file=sys.stderr)
        else:
            result = kubectl.run("delete", "namespace", name, "--wait=true", "--timeout=180s", check=False, timeout=240)
            if result.returncode != 0:
                print(f"e2e cleanup: namespace {name}: {result.stderr.strip()}", file=sys.stderr)


@pytest.fixture(scope="session")
def sa_kubeconfig(kubectl: Kubectl, installed: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig that authenticates as the tokensync ServiceAccount (server and CA from the admin one)."""
    duration = int(max(3600, SOAK_SECONDS + 1800))
    token = kubectl.run("create", "token", "tokensync", "-n", OPERATOR_NAMESPACE, f"--duration={duration}s").stdout
    view = kubectl.json("config", "view", "--raw", "--minify", "--flatten")
    cluster = view["clusters"][0]["cluster"]  # server, certificate-authority-data, tls-server-name, proxy-url...
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "tokensync", "user": {"token": token.strip()}}],
        "contexts": [{"name": "tokensync", "context": {"cluster": "e2e", "user": "tokensync"}}],
        "current-context": "tokensync",
    }
    path = tmp_path_factory.mktemp("e2e-sa") / "kubeconfig"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return path


# -- the operator, as a subprocess ---------------------------------------------------------------------


@dataclass
class OperatorProcess:
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, needle: str, timeout: float, since: int = 0) -> None:
        """Until ``needle`` is in the log after position ``since`` (a ``len(log())`` taken earlier)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log()[since:]:
            if not self.running:
                code = self.process.returncode if self.process else None
                pytest.fail(f"the operator exited ({code}) before logging {needle!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the operator did not log {needle!r} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def restart(self) -> None:
        """Start again after :meth:`stop`, and wait as the session fixture does (for this run's log lines)."""
        since = len(self.log())
        self.start()
        self.wait_for_log("tokensync started", timeout=WAIT_SECONDS, since=since)
        if WATCH == "namespace":
            self.wait_for_log(NAMESPACE_FALLBACK_LOG, timeout=NAMESPACE_FALLBACK_SECONDS, since=since)

    def stop(self, timeout: float = 30) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()  # SIGTERM: kopf runs the cleanup handlers
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


def operator_command() -> list[str]:
    """`tokensync` from this interpreter's environment (there is no `python -m tokensync.cli`)."""
    script = Path(sys.executable).with_name("tokensync")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from tokensync.cli import main; main()"]


@pytest.fixture(scope="session")
def operator(
    namespace: str, sa_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """`tokensync run -A` (or `--namespace`) as the tokensync ServiceAccount, until the session ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSYNC_")}
    # `tokensync run` logs kopf in with --kubeconfig too; $KUBECONFIG points at the same
    # file so that nothing in the process can fall back to the admin's credentials.
    env["KUBECONFIG"] = str(sa_kubeconfig)
    env["PYTHONUNBUFFERED"] = "1"
    scope = ["--all-namespaces"] if WATCH == "all" else ["--namespace", namespace]
    command = [*operator_command(), "run", "--kubeconfig", str(sa_kubeconfig), *scope, "--liveness", ""]
    process = OperatorProcess(command, env, tmp_path_factory.mktemp("e2e-operator") / "operator.log")
    process.start()
    try:
        process.wait_for_log("tokensync started", timeout=WAIT_SECONDS)
        if WATCH == "namespace":
            process.wait_for_log(NAMESPACE_FALLBACK_LOG, timeout=NAMESPACE_FALLBACK_SECONDS)
        yield process
    finally:
        code = process.stop()
        print(f"e2e: operator stopped with exit code {code}; log at {process.log_path}", file=sys.stderr)


# -- the identity provider --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e2e_idp(make_idp: Callable[..., IdpProcess]) -> IdpProcess:
    """The real test IdP (tests/support/idp.py) with short-lived access tokens, on 127.0.0.1."""
    return make_idp(access_token_lifetime=TOKEN_LIFETIME)


# -- everything together -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The test namespace with the operator running; helpers the journey uses."""

    kubectl: Kubectl
    sa: Kubectl
    namespace: str
    operator: OperatorProcess
    idp: IdpProcess
    soak_seconds: float = SOAK_SECONDS
    token_lifetime: int = TOKEN_LIFETIME
    wait_seconds: float = WAIT_SECONDS
    watch: str = WATCH
    kills: int = KILLS
    #: Every secret value the test handed out or saw, for the log leak check.
    secret_values: set[str] = field(default_factory=set)

    def apply(self, *docs: dict[str, Any]) -> None:
        self.kubectl.apply(*docs, namespace=self.namespace)

    def secret(self, name: str, values: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
        self.secret_values.update(v for v in values.values() if len(v) >= 8)
        meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}

    def credential(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.kubectl.json("get", "oauthcredential", name, "-n", self.namespace)
        return body

    def condition(self, name: str, kind: str = "Ready") -> dict[str, Any] | None:
        conditions = (self.credential(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c.get("type") == kind), None)

    def wait_ready(self, name: str) -> None:
        self.kubectl.run(
            "wait",
            "--for=condition=Ready",
            f"oauthcredential/{name}",
            "-n",
            self.namespace,
            f"--timeout={self.wait_seconds:.0f}s",
            timeout=self.wait_seconds + 30,
        )

    def read_secret(self, name: str) -> dict[str, Any] | None:
        out = self.kubectl.run("get", "secret", name, "-n", self.namespace, "--ignore-not-found", "-o", "json").stdout
        return json.loads(out) if out.strip() else None

    def secret_data(self, name: str) -> dict[str, str]:
        body = self.read_secret(name)
        assert body is not None, f"Secret {self.namespace}/{name} does not exist"
        values = {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}
        if values.get("access_token"):
            self.secret_values.add(values["access_token"])
        return values

    def bootstrap_refresh_token(self, client_id: str, username: str) -> str:
        """A refresh token from a password grant, made by the test, as a user would bootstrap one."""
        response = httpx.post(
            self.idp.token_url,
            data={"grant_type": "password", "username": username, "password": self.idp.password(username)},
            auth=(client_id, self.idp.client_secret(client_id)),
            timeout=30,
        )
        response.raise_for_status()
        token = str(response.json()["refresh_token"])
        self.secret_values.add(token)
        return token

    def poll(self, what: str, check: Callable[[], bool], timeout: float | None = None, interval: float = 2) -> None:
        deadline = time.monotonic() + (timeout or self.wait_seconds)
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout or self.wait_seconds:.0f} s waiting for {what}")
            time.sleep(interval)

    def diagnostics(self) -> str:
        parts = [f"--- operator ({'running' if self.operator.running else 'exited'}), last lines of its log ---"]
        parts.append(self.operator.log_tail())
        commands = [
            ("get", "oauthcredential", "-n", self.namespace, "-o", "yaml"),
            ("get", "secrets", "-n", self.namespace, "-L", "tokensync.dev/role"),  # names and labels, no data
            ("get", "events", "-n", self.namespace, "--sort-by=.lastTimestamp"),
        ]
        for args in commands:
            parts.append(f"--- kubectl {' '.join(args)} ---")
            try:
                result = self.kubectl.run(*args, check=False, timeout=30)
                parts.append(result.stdout or result.stderr)
            except KubectlError as exc:
                parts.append(str(exc))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def cluster(
    kubectl: Kubectl, namespace: str, sa_kubeconfig: Path, operator: OperatorProcess, e2e_idp: IdpProcess
) -> Cluster:
    return Cluster(
        kubectl=kubectl,
        sa=Kubectl(kubectl.binary, str(sa_kubeconfig)),
        namespace=namespace,
        operator=operator,
        idp=e2e_idp,
    )
