"""The operator's own API client (tokensync.controller.kube) against small fake API servers.

The fakes are real aiohttp servers on loopback, so the client's own transport, TLS and
retry paths run; no mocks. What they check:

* a write retried after a 5xx or a lost answer, whose first attempt the server had
  applied, meets its own write as a 409: that is success when the object read back holds
  what was sent, and a conflict otherwise;
* bearer tokens come from the kubernetes Configuration, exec plugins run off the event
  loop and are reused, not run per request;
* TLS from kubeconfig: CA data, client certificates, insecure-skip-tls-verify;
* no token in exception texts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import itertools
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tokensync.controller import kube as kube_module
from tokensync.controller.kube import USER_AGENT, KubeClient, load_configuration
from tokensync.stores.kubernetes import ApiConflictError, ApiError

NS = "team"


class FakeApi:
    """Secrets in a dict with resourceVersions, as the API server keeps them.

    ``apply_then_fail``: the next N writes are applied, then answered 500 (or, with
    ``drop=True``, the connection is closed without an answer). ``after_apply`` runs after
    such an applied-but-failed write: a concurrent writer.
    """

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.apply_then_fail = 0
        self.drop = False
        self.after_apply: Any = None
        self.requests: list[tuple[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.status_override: list[int] = []
        self.url = ""

    def stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        body = {**body, "metadata": {**body["metadata"], "namespace": NS, "resourceVersion": str(self.version)}}
        body.setdefault("type", "Opaque")
        self.items[body["metadata"]["name"]] = body
        return body

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/v1/namespaces/{ns}/secrets", self.collection)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/secrets/{name}", self.member)
        return app

    def status(self, code: int, reason: str) -> web.Response:
        return web.json_response({"kind": "Status", "code": code, "reason": reason, "message": reason}, status=code)

    def note(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path))
        self.headers.append(dict(request.headers))
        if self.status_override:
            code = self.status_override.pop(0)
            return self.status(code, "Unauthorized" if code == 401 else "TooManyRequests")
        return None

    async def applied(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.apply_then_fail:
            self.apply_then_fail -= 1
            if self.after_apply is not None:
                self.after_apply()
            if self.drop:
                assert request.transport is not None
                request.transport.close()  # applied, but the answer is lost
            return self.status(500, "InternalError")
        return web.json_response(body, status=201 if request.method == "POST" else 200)

    async def collection(self, request: web.Request) -> web.StreamResponse:
        if (early := self.note(request)) is not None:
            return early
        if request.method == "GET":
            return web.json_response({"kind": "SecretList", "metadata": {}, "items": list(self.items.values())})
        body = await request.json()
        if body["metadata"]["name"] in self.items:
            return self.status(409, "AlreadyExists")
        return await self.applied(request, self.stamp(body))

    async def member(self, request: web.Request) -> web.StreamResponse:
        if (early := self.note(request)) is not None:
            return early
        name = request.match_info["name"]
        current = self.items.get(name)
        if request.method == "GET":
            return web.json_response(current) if current else self.status(404, "NotFound")
        if current is None:
            return self.status(404, "NotFound")
        body = await request.json()
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return self.status(409, "Conflict")
        return await self.applied(request, self.stamp(body))


async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert server is not None
    port: int = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def api():
    fake = FakeApi()
    runner, port = await serve(fake.app())
    fake.url = f"http://127.0.0.1:{port}"
    client = KubeClient.for_url(fake.url)
    try:
        yield fake, client
    finally:
        await client.close()
        await runner.cleanup()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """The client's backoff sleeps (0.2 s doubling) are the API server's to wait out, not the tests'."""
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: Any) -> Any:
        return await real_sleep(min(delay, 0.01), *args)

    monkeypatch.setattr(kube_module.asyncio, "sleep", sleep)


def secret(name: str, value: str, **meta: Any) -> dict[str, Any]:
    encoded = base64.b64encode(value.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "labels": {"tokensync.dev/role": "state"}, **meta},
        "data": {"state": encoded},
    }


def methods(fake: FakeApi) -> list[str]:
    return [method for method, _ in fake.requests]


# -- writes retried after an answer was lost ----------------------------------------------


@pytest.mark.parametrize("drop", [False, True], ids=["500-after-apply", "connection-lost-after-apply"])
async def test_a_replace_applied_before_its_5xx_is_a_success(api, drop):
    fake, client = api
    first = await client.create_secret(NS, secret("s", "one"))
    fake.apply_then_fail, fake.drop = 1, drop
    body = secret("s", "two", resourceVersion=first["metadata"]["resourceVersion"])

    written = await client.replace_secret(NS, "s", body)

    assert written["data"] == body["data"]
    assert written["metadata"]["resourceVersion"] == fake.items["s"]["metadata"]["resourceVersion"]
    assert methods(fake) == ["POST", "PUT", "PUT", "GET"]  # applied, 409 on retry, read back
    assert client.requests[("GET", "secrets")] == 1


async def test_a_replace_overtaken_by_another_writer_is_still_a_conflict(api):
    fake, client = api
    first = await client.create_secret(NS, secret("s", "one"))
    fake.apply_then_fail = 1
    fake.after_apply = lambda: fake.stamp(secret("s", "someone else's"))
    body = secret("s", "two", resourceVersion=first["metadata"]["resourceVersion"])

    with pytest.raises(ApiConflictError) as caught:
        await client.replace_secret(NS, "s", body)

    assert caught.value.status == 409 and caught.value.reason == "Conflict"
    assert methods(fake) == ["POST", "PUT", "PUT", "GET"]


async def test_a_plain_conflict_is_not_read_back(api):
    fake, client = api
    await client.create_secret(NS, secret("s", "one"))
    with pytest.raises(ApiConflictError):
        await client.replace_secret(NS, "s", secret("s", "one", resourceVersion="stale"))
    with pytest.raises(ApiConflictError) as caught:
        await client.create_secret(NS, secret("s", "one"))  # the same content: still AlreadyExists
    assert caught.value.reason == "AlreadyExists"
    assert methods(fake) == ["POST", "PUT", "POST"]


async def test_a_conflict_after_a_429_is_not_read_back(api):
    """429: the server refused the request before handling it, so nothing was applied."""
    fake, client = api
    await client.create_secret(NS, secret("s", "one"))
    fake.status_override = [429]
    with pytest.raises(ApiConflictError):
        await client.create_secret(NS, secret("s", "one"))
    assert methods(fake) == ["POST", "POST", "POST"]


@pytest.mark.parametrize("drop", [False, True], ids=["500-after-apply", "connection-lost-after-apply"])
async def test_a_create_applied_before_its_5xx_is_a_success(api, drop):
    fake, client = api
    fake.apply_then_fail, fake.drop = 1, drop
    body = secret("s", "one", annotations={"tokensync.dev/credential": "api"})

    written = await client.create_secret(NS, body)

    assert written["metadata"]["resourceVersion"] == "1"
    assert written["data"] == body["data"]
    assert methods(fake) == ["POST", "POST", "GET"]


async def test_a_create_that_found_another_objects_is_already_exists(api):
    fake, client = api
    fake.apply_then_fail = 1
    fake.after_apply = lambda: fake.stamp(secret("s", "other"))  # replaced in between
    with pytest.raises(ApiConflictError) as caught:
        await client.create_secret(NS, secret("s", "one"))
    assert caught.value.reason == "AlreadyExists"


async def test_read_back_compares_our_labels_and_annotations():
    sent = secret("s", "one", annotations={"a": "1"})
    same = {**sent, "metadata": {**sent["metadata"], "labels": {**sent["metadata"]["labels"], "extra": "x"}}}
    assert kube_module._matches(sent, same)  # a label added by someone else: ours still applied
    changed = {**sent, "metadata": {**sent["metadata"], "annotations": {"a": "2"}}}
    assert not kube_module._matches(sent, changed)
    assert not kube_module._matches(sent, {**sent, "type": "kubernetes.io/tls"})
    assert not kube_module._matches(sent, None)


async def test_server_errors_are_retried_then_raised(api):
    fake, client = api
    fake.status_override = [500] * 5
    with pytest.raises(ApiError) as caught:
        await client.read_secret(NS, "s")
    assert caught.value.status == 500
    assert len(fake.requests) == 5


async def test_an_unreachable_server_is_an_api_error():
    client = KubeClient.for_url("http://127.0.0.1:9", token="test-secret-unreachable")
    try:
        with pytest.raises(ApiError) as caught:
            await client.read_secret(NS, "s")
    finally:
        await client.close()
    assert caught.value.status == 0
    assert "test-secret" not in str(caught.value)


# -- authentication from the kubernetes Configuration -----------------------------------------


def kubeconfig(path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> str:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(document))
    return str(path)


async def test_the_configurations_token_and_user_agent_are_sent(api, tmp_path):
    fake, _ = api
    url = fake.url
    configuration = load_configuration(kubeconfig(tmp_path / "kc", url, {"token": "test-secret-sa-token"}))
    client = KubeClient.from_configuration(configuration)
    try:
        await client.list_secrets(NS, label_selector="x")
        fake.status_override = [401]
        with pytest.raises(ApiError) as caught:
            await client.read_secret(NS, "s")
    finally:
        await client.close()
    assert [h.get("Authorization") for h in fake.headers] == ["Bearer test-secret-sa-token"] * 2
    assert {h.get("User-Agent") for h in fake.headers} == {USER_AGENT}
    assert caught.value.status == 401
    assert "test-secret" not in str(caught.value)


EXEC_PLUGIN = """\
import datetime, json, sys, time
with open(sys.argv[1], "a") as log:
    log.write("run\\n")
time.sleep(float(sys.argv[2]))
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=float(sys.argv[3]))
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1beta1",
    "kind": "ExecCredential",
    "status": {"token": "test-secret-exec-token", "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")},
}))
"""


def exec_user(tmp_path: Path, *, delay: float, lifetime: float) -> tuple[dict[str, Any], Path]:
    script = tmp_path / "plugin.py"
    script.write_text(EXEC_PLUGIN)
    runs = tmp_path / "runs"
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(script), str(runs), str(delay), str(lifetime)],
            "interactiveMode": "Never",
        }
    }
    return user, runs


async def test_an_exec_plugin_runs_off_the_event_loop_and_is_reused(api, tmp_path, monkeypatch):
    """The plugin's token is near its expiry (within the kubernetes client's 5-minute skew),
    so the Configuration runs the plugin again each time it is asked: the client asks it in a
    worker thread, at most once per reuse window, never once per request."""
    fake, _ = api
    url = fake.url
    user, runs = exec_user(tmp_path, delay=0.3, lifetime=60)
    configuration = await asyncio.to_thread(load_configuration, kubeconfig(tmp_path / "kc", url, user))
    assert runs.read_text().count("run") == 1  # load_kube_config ran it once

    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    client = KubeClient.from_configuration(configuration)
    task = asyncio.get_running_loop().create_task(ticker())
    try:
        await asyncio.gather(*(client.read_secret(NS, f"s{i}") for i in range(10)))
        for i in range(10):
            await client.read_secret(NS, f"t{i}")
    finally:
        task.cancel()
        await client.close()
    assert runs.read_text().count("run") == 2  # one more run for 20 requests, not 20 more
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.2, "the plugin (0.3 s) blocked the event loop"
    assert {h.get("Authorization") for h in fake.headers} == {"Bearer test-secret-exec-token"}

    monkeypatch.setattr(kube_module, "TOKEN_REUSE_SECONDS", 0.0)  # the reuse window has passed
    client = KubeClient.from_configuration(configuration)
    try:
        await client.read_secret(NS, "u")
    finally:
        await client.close()
    assert runs.read_text().count("run") == 3


async def test_a_fresh_exec_token_is_not_fetched_again(api, tmp_path, monkeypatch):
    fake, _ = api
    url = fake.url
    user, runs = exec_user(tmp_path, delay=0, lifetime=3600)
    configuration = await asyncio.to_thread(load_configuration, kubeconfig(tmp_path / "kc", url, user))
    monkeypatch.setattr(kube_module, "TOKEN_REUSE_SECONDS", 0.0)
    client = KubeClient.from_configuration(configuration)
    try:
        for _i in range(3):
            await client.read_secret(NS, "s")
    finally:
        await client.close()
    assert runs.read_text().count("run") == 1  # valid for an hour: the loader's run is reused
    assert {h.get("Authorization") for h in fake.headers} == {"Bearer test-secret-exec-token"}


# -- TLS from kubeconfig ------------------------------------------------------------------------


def pki() -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def leaf(cn: str, serial: int, usage: Any, san: Any = None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )  # fmt: skip
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf(
        "127.0.0.1", 2, ExtendedKeyUsageOID.SERVER_AUTH, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    client_cert, client_key = leaf("tokensync", 3, ExtendedKeyUsageOID.CLIENT_AUTH)
    return {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


@pytest.fixture
async def tls_api(tmp_path):
    """A fake API server on HTTPS that requires a client certificate signed by the CA."""
    material = pki()
    for key, value in material.items():
        (tmp_path / f"{key}.pem").write_bytes(value)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(str(tmp_path / "server_cert.pem"), str(tmp_path / "server_key.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    fake = FakeApi()
    runner, port = await serve(fake.app(), context)
    try:
        yield fake, f"https://127.0.0.1:{port}", material
    finally:
        await runner.cleanup()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_tls_with_ca_data_and_a_client_certificate(tls_api, tmp_path):
    fake, url, pem = tls_api
    user = {"client-certificate-data": b64(pem["client_cert"]), "client-key-data": b64(pem["client_key"])}
    cluster = {"certificate-authority-data": b64(pem["ca"])}
    configuration = load_configuration(kubeconfig(tmp_path / "kc", url, user, cluster))
    client = KubeClient.from_configuration(configuration)
    try:
        assert await client.read_secret(NS, "missing") is None
    finally:
        await client.close()
    assert methods(fake) == ["GET"]


async def test_tls_with_ca_and_certificate_files(tls_api, tmp_path):
    fake, url, _pem = tls_api
    user = {"client-certificate": str(tmp_path / "client_cert.pem"), "client-key": str(tmp_path / "client_key.pem")}
    configuration = load_configuration(
        kubeconfig(tmp_path / "kc", url, user, {"certificate-authority": str(tmp_path / "ca.pem")})
    )
    client = KubeClient.from_configuration(configuration)
    try:
        assert await client.list_secrets(NS, label_selector="tokensync.dev/role") == []
    finally:
        await client.close()
    assert methods(fake) == ["GET"]


async def test_tls_rejects_a_server_the_ca_did_not_sign(tls_api, tmp_path):
    fake, url, pem = tls_api
    other = pki()
    user = {"client-certificate-data": b64(pem["client_cert"]), "client-key-data": b64(pem["client_key"])}
    configuration = load_configuration(
        kubeconfig(tmp_path / "kc", url, user, {"certificate-authority-data": b64(other["ca"])})
    )
    client = KubeClient.from_configuration(configuration)
    try:
        with pytest.raises(ApiError) as caught:
            await client.read_secret(NS, "s")
    finally:
        await client.close()
    assert caught.value.status == 0
    assert fake.requests == []


async def test_insecure_skip_tls_verify(tls_api, tmp_path):
    fake, url, pem = tls_api
    user = {"client-certificate-data": b64(pem["client_cert"]), "client-key-data": b64(pem["client_key"])}
    configuration = load_configuration(kubeconfig(tmp_path / "kc", url, user, {"insecure-skip-tls-verify": True}))
    assert not configuration.verify_ssl
    client = KubeClient.from_configuration(configuration)
    try:
        assert await client.read_secret(NS, "s") is None
    finally:
        await client.close()
    assert methods(fake) == ["GET"]
