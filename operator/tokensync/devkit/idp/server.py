"""Start the identity provider in this process: bind, configure Django, migrate, serve.

One implementation for both ways of running it: ``tokensync demo`` calls
:func:`start_idp` and keeps the server in a thread; the test fixtures run
``python -m tokensync.devkit.idp`` (a thin CLI over the same call) so every test
session can have several independent IdPs and a crash never takes pytest with it.

Django's settings are process-global and can be configured once, so a process can
host one IdP for its whole life; a second :func:`start_idp` raises.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensync.devkit.idp.client import IdpAdmin
from tokensync.devkit.idp.config import INTROSPECTOR_CLIENT_ID, ClientConfig, IdpConfig
from tokensync.devkit.idp.settings import OAUTH_PREFIX, TOKEN_PATH, build_settings
from tokensync.devkit.idp.state import STATE

__all__ = ["ADMIN_TOKEN_FILE", "RunningIdp", "start_idp"]

#: Written into the state directory (mode 0600) before the server reports ready, so a
#: parent process can drive ``/admin-test/`` without the token crossing stdout.
ADMIN_TOKEN_FILE = "admin-token"
_OIDC_KEY_FILE = "oidc-rsa-key.pem"

_started = threading.Lock()
_started_once = False


@dataclass
class RunningIdp:
    """A serving identity provider; :meth:`stop` it (it is also a context manager)."""

    url: str
    state_dir: Path
    admin_token: str = field(repr=False)
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _owns_state_dir: bool = field(default=False, repr=False)

    @property
    def issuer_url(self) -> str:
        """The OIDC issuer; discovery is at ``issuer_url + "/.well-known/openid-configuration"``."""
        return self.url + OAUTH_PREFIX

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def introspection_url(self) -> str:
        return self.url + OAUTH_PREFIX + "/introspect/"

    @property
    def revocation_url(self) -> str:
        return self.url + OAUTH_PREFIX + "/revoke_token/"

    @property
    def discovery_url(self) -> str:
        return self.issuer_url + "/.well-known/openid-configuration"

    @property
    def admin(self) -> IdpAdmin:
        """A client for ``/admin-test/`` and introspection."""
        return IdpAdmin(self.url, self.admin_token)

    def stop(self) -> None:
        """Stop serving, wait for the loop to end, and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        from django.db import connections

        connections.close_all()
        if self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> RunningIdp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_idp(config: IdpConfig, *, port: int = 0, state_dir: Path | str | None = None) -> RunningIdp:
    """Serve ``config`` on ``http://127.0.0.1:<port>`` (0 picks a free port) from a thread.

    ``state_dir`` holds the SQLite database, the OIDC signing key and the admin token;
    reusing one across runs keeps issued tokens valid (an IdP "restart"). Without it
    a temporary directory is used and removed on :meth:`RunningIdp.stop`.
    """
    global _started_once
    with _started:
        if _started_once:
            raise RuntimeError("one identity provider per process (Django settings are global)")
        _started_once = True

    owns_state_dir = state_dir is None
    directory = Path(tempfile.mkdtemp(prefix="tokensync-idp-") if state_dir is None else state_dir)
    directory.mkdir(parents=True, exist_ok=True)

    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    # Bind first: the issuer URL (pinned in the settings) needs the real port.
    server = ThreadedWSGIServer(("127.0.0.1", port), WSGIRequestHandler)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        admin_token = f"idp-admin-secret-{secrets.token_urlsafe(24)}"
        _configure_django(config, url=url, state_dir=directory, admin_token=admin_token)
        _apply_config(config, admin_token=admin_token, base_url=url)
        _write_private(directory / ADMIN_TOKEN_FILE, admin_token)

        from django.core.wsgi import get_wsgi_application

        server.set_app(get_wsgi_application())
        thread = threading.Thread(target=server.serve_forever, name="tokensync-idp", daemon=True)
        thread.start()
    except BaseException:
        server.server_close()
        if owns_state_dir:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return RunningIdp(
        url=url,
        state_dir=directory,
        admin_token=admin_token,
        _server=server,
        _thread=thread,
        _owns_state_dir=owns_state_dir,
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (created 0600, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _oidc_private_key(state_dir: Path) -> str:
    """The RS256 key DOT signs ID tokens with; kept across restarts of the same state dir."""
    path = state_dir / _OIDC_KEY_FILE
    if path.exists():
        return path.read_text()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    _write_private(path, pem)
    return pem


def _configure_django(config: IdpConfig, *, url: str, state_dir: Path, admin_token: str) -> None:
    import django
    from django.conf import settings
    from django.core.management import call_command

    if settings.configured:
        raise RuntimeError("Django is already configured in this process; run the IdP as a subprocess")
    options = build_settings(
        config,
        base_url=url,
        state_dir=state_dir,
        oidc_private_key_pem=_oidc_private_key(state_dir),
        admin_token=admin_token,
    )
    settings.configure(**options)
    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    from django.db import connection

    with connection.cursor() as cursor:
        # Readers never wait for the writer; the setting sticks to the database file.
        cursor.execute("PRAGMA journal_mode=WAL")


def _introspector(admin_token: str) -> ClientConfig:
    return ClientConfig.model_validate(
        {
            "client_id": INTROSPECTOR_CLIENT_ID,
            "client_secret": admin_token,
            "grant_types": ["client_credentials"],
            "auth_method": "client_secret_basic",
            "strict_auth_method": True,
        }
    )


def _apply_config(config: IdpConfig, *, admin_token: str, base_url: str) -> None:
    """Upsert clients and users into DOT's tables; drop those no longer configured."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from oauth2_provider.models import get_application_model

    application_model = get_application_model()
    user_model = get_user_model()
    introspector = _introspector(admin_token)
    clients = (*config.clients, introspector)
    with transaction.atomic():
        for client in clients:
            if client.client_secret is not None:
                secret = client.client_secret.get_secret_value()
            elif client.is_public:
                secret = ""
            else:
                # private_key_jwt: DOT requires some secret on a confidential client; an
                # unguessable one nobody knows, and the validator refuses secrets anyway.
                secret = secrets.token_urlsafe(32)
            application_model.objects.update_or_create(
                client_id=client.client_id,
                defaults={
                    "name": client.client_id,
                    "client_type": "public" if client.is_public else "confidential",
                    # DOT allows one grant type per application; the validator enforces
                    # the configured list, so this only has to be a plausible one.
                    "authorization_grant_type": (
                        "password" if "password" in client.grant_types else "client-credentials"
                    ),
                    "client_secret": secret,
                    # Plaintext storage: PBKDF2 costs ~0.4 s of CPU on every client
                    # authentication, and these are throwaway test credentials.
                    "hash_client_secret": False,
                    "redirect_uris": "",
                    "algorithm": "",
                },
            )
        application_model.objects.exclude(client_id__in=[c.client_id for c in clients]).delete()
        for user in config.users:
            account, _ = user_model.objects.get_or_create(username=user.username)
            account.set_password(user.password.get_secret_value())
            account.is_active = True
            account.save()
        user_model.objects.exclude(username__in=[u.username for u in config.users]).delete()

    STATE.load(config, extra_clients=[introspector])
    STATE.assertion_audiences = (
        base_url + TOKEN_PATH,
        (base_url + TOKEN_PATH).rstrip("/"),
        base_url + OAUTH_PREFIX,
    )
