"""
The real identity provider (``tokensync.devkit.idp``, django-oauth-toolkit) as a subprocess.

A subprocess rather than a thread: Django's settings are global to a process, so this
is the only way to have several IdPs (different lifetimes, policies) in one session,
and an IdP crash shows up as a clear failure instead of taking pytest down with it.

Every secret in :func:`standard_config` contains "secret", so a leak scan of logs or
Kubernetes objects can grep for it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pyotp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel

from tokensync.devkit.idp import IdpAdmin, IdpConfig
from tokensync.devkit.idp.config import ClientConfig, UserConfig
from tokensync.devkit.idp.server import ADMIN_TOKEN_FILE
from tokensync.devkit.idp.wire import JWT_BEARER_ASSERTION_TYPE

__all__ = [
    "JWT_BEARER_ASSERTION_TYPE",
    "IdpKeys",
    "IdpProcess",
    "client_assertion",
    "config_key",
    "generate_keys",
    "standard_config",
    "start_idp_process",
]

READY_TIMEOUT = 30.0

# Secrets of the standard config; every one contains "secret" for leak scans.
CC_SECRET = "cc-secret-3f9a"
PW_SECRET = "pw-secret-81c2"
ALICE_PASSWORD = "alice-password-secret"
BOB_PASSWORD = "bob-password-secret"
BOB_TOTP_SEED = "BOBSECRETTOTPSEEDBOBSECRETTOTP22"  # base32, 160 bits


@dataclass(frozen=True)
class IdpKeys:
    """Private keys (PEM) of the private_key_jwt clients, and their public halves."""

    rs_private_key_pem: str
    rs_public_key_pem: str
    es_private_key_pem: str
    es_public_key_pem: str


def _pems(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def generate_keys() -> IdpKeys:
    """A fresh RSA-2048 and EC P-256 key pair (≈0.1 s; do it once per session)."""
    rs_private, rs_public = _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    es_private, es_public = _pems(ec.generate_private_key(ec.SECP256R1()))
    return IdpKeys(rs_private, rs_public, es_private, es_public)


def standard_config(keys: IdpKeys, **changes: Any) -> IdpConfig:
    """The suite's standard clients and users; ``changes`` replace top-level IdpConfig fields."""
    config = IdpConfig(
        access_token_lifetime=3600,
        clients=(
            ClientConfig.model_validate(
                {
                    "client_id": "cc-client",
                    "client_secret": CC_SECRET,
                    "grant_types": ["client_credentials", "refresh_token"],
                }
            ),
            ClientConfig.model_validate(
                {
                    "client_id": "pw-client",
                    "client_secret": PW_SECRET,
                    "grant_types": ["password", "refresh_token"],
                }
            ),
            ClientConfig.model_validate(
                {"client_id": "public-client", "grant_types": ["password", "refresh_token"], "auth_method": "none"}
            ),
            ClientConfig.model_validate(
                {
                    "client_id": "jwt-rs-client",
                    "grant_types": ["client_credentials"],
                    "public_key_pem": keys.rs_public_key_pem,
                }
            ),
            ClientConfig.model_validate(
                {
                    "client_id": "jwt-es-client",
                    "grant_types": ["client_credentials"],
                    "public_key_pem": keys.es_public_key_pem,
                }
            ),
        ),
        users=(
            UserConfig.model_validate({"username": "alice", "password": ALICE_PASSWORD}),
            UserConfig.model_validate({"username": "bob", "password": BOB_PASSWORD, "totp_seed": BOB_TOTP_SEED}),
        ),
    )
    return config.with_changes(**changes) if changes else config


def client_assertion(
    client_id: str,
    private_key_pem: str,
    audience: str,
    *,
    algorithm: str | None = None,
    jti: str | None = None,
    lifetime: int = 60,
    **claims: Any,
) -> str:
    """An RFC 7523 client assertion: iss = sub = client_id, aud, exp, a fresh jti."""
    now = int(time.time())
    payload = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or uuid.uuid4().hex,
        **claims,
    }
    if algorithm is None:
        algorithm = "RS256" if _is_rsa(private_key_pem) else "ES256"
    return jwt.encode(payload, private_key_pem, algorithm=algorithm)


def _is_rsa(private_key_pem: str) -> bool:
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    return isinstance(key, rsa.RSAPrivateKey)


@dataclass
class IdpProcess:
    """A running ``python -m tokensync.devkit.idp`` and what a test needs to talk to it."""

    config: IdpConfig
    url: str
    state_dir: Path
    admin: IdpAdmin = field(repr=False)
    keys: IdpKeys | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- where things are --------------------------------------------------------------
    @property
    def issuer_url(self) -> str:
        """OIDC issuer; discovery is ``issuer_url + "/.well-known/openid-configuration"``."""
        return f"{self.url}/o"

    @property
    def token_url(self) -> str:
        return f"{self.url}/o/token/"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/o/introspect/"

    @property
    def revocation_url(self) -> str:
        return f"{self.url}/o/revoke_token/"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer_url}/.well-known/openid-configuration"

    # -- the configured world ----------------------------------------------------------
    @property
    def clients(self) -> dict[str, ClientConfig]:
        return {client.client_id: client for client in self.config.clients}

    @property
    def users(self) -> dict[str, UserConfig]:
        return {user.username: user for user in self.config.users}

    def client_secret(self, client_id: str) -> str:
        """The configured secret (not a rotated one: the test that rotates knows that)."""
        secret = self.clients[client_id].client_secret
        assert secret is not None, f"{client_id} has no secret"
        return secret.get_secret_value()

    def password(self, username: str) -> str:
        return self.users[username].password.get_secret_value()

    def totp(self, username: str) -> str:
        """The user's current TOTP code."""
        seed = self.users[username].totp_seed
        assert seed is not None, f"{username} has no TOTP seed"
        return pyotp.TOTP(seed.get_secret_value()).now()

    @property
    def jwt_rs_private_key_pem(self) -> str:
        assert self.keys is not None
        return self.keys.rs_private_key_pem

    @property
    def jwt_es_private_key_pem(self) -> str:
        assert self.keys is not None
        return self.keys.es_private_key_pem

    def client_assertion(self, client_id: str, **kwargs: Any) -> str:
        """A fresh, valid assertion for ``jwt-rs-client`` / ``jwt-es-client``."""
        key = {"jwt-rs-client": self.jwt_rs_private_key_pem, "jwt-es-client": self.jwt_es_private_key_pem}
        return client_assertion(client_id, key[client_id], kwargs.pop("audience", self.token_url), **kwargs)

    # -- changing the world (admin endpoints) -----------------------------------------
    def introspect(self, token: str) -> dict[str, Any]:
        return self.admin.introspect(token)

    def token_request_count(
        self, client_id: str | None = None, grant_type: str | None = None, status: int | None = None
    ) -> int:
        return self.admin.token_request_count(client_id, grant_type, status)

    def refresh_token_reuse_count(self, client_id: str | None = None) -> int:
        """Presentations of already-rotated or revoked refresh tokens (spent twice)."""
        return self.admin.refresh_token_reuse_count(client_id)

    def reset_counters(self) -> None:
        self.admin.reset_counters()

    def set_password(self, username: str, password: str) -> None:
        self.admin.set_password(username, password)

    def rotate_client_secret(self, client_id: str, new_secret: str) -> None:
        self.admin.rotate_client_secret(client_id, new_secret)

    def revoke_client_tokens(self, client_id: str) -> dict[str, Any]:
        return self.admin.revoke_client_tokens(client_id)

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start it again after :meth:`stop`: same port, same database (issued tokens survive).

        For outage tests. The admin token changes with every start; :attr:`admin` follows.
        """
        if self.running:
            return
        self._process, url, admin_token = _spawn(self.state_dir, self.port, timeout)
        assert url == self.url, (url, self.url)
        self.admin = IdpAdmin(url, admin_token)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code.

        ``None`` if it was already stopped. A clean SIGTERM shutdown exits 0.
        """
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return process.returncode


def start_idp_process(
    config: IdpConfig,
    state_dir: Path,
    *,
    keys: IdpKeys | None = None,
    port: int = 0,
    timeout: float = READY_TIMEOUT,
) -> IdpProcess:
    """Start the IdP (``port=0``: a free port) and wait for its READY line (stderr in the error if not)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / "config.json"
    config_path.write_text(config.to_json())
    config_path.chmod(0o600)
    process, url, admin_token = _spawn(state_dir, port, timeout)
    return IdpProcess(
        config=config,
        url=url,
        state_dir=state_dir,
        admin=IdpAdmin(url, admin_token),
        keys=keys,
        _process=process,
    )


def _spawn(state_dir: Path, port: int, timeout: float) -> tuple[subprocess.Popen[bytes], str, str]:
    stderr_path = state_dir / "stderr.log"
    with stderr_path.open("ab") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokensync.devkit.idp",
                "--port",
                str(port),
                "--config",
                str(state_dir / "config.json"),
                "--state-dir",
                str(state_dir),
                # If pytest dies without stopping us, our stdin closes and we exit.
                "--exit-on-stdin-eof",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    stdout = process.stdout
    assert stdout is not None
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    ready = line[0].decode().strip() if line else ""
    if not ready.startswith("READY "):
        if process.poll() is None:
            process.kill()
        process.wait()
        raise RuntimeError(
            f"the IdP did not report READY within {timeout:.0f} s "
            f"(exit code {process.returncode}, stdout {ready!r}); stderr:\n" + stderr_path.read_text(errors="replace")
        )
    url = ready.split(" ", 1)[1]
    return process, url, (state_dir / ADMIN_TOKEN_FILE).read_text()


def config_key(changes: dict[str, Any]) -> str:
    """A stable cache key for :func:`standard_config` overrides (secrets included, so
    two configs differing only in a secret do not share an IdP)."""

    def encode(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json", context={"reveal_secrets": True})
        return str(value)

    return json.dumps(changes, sort_keys=True, default=encode)
