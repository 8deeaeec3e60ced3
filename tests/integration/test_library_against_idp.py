"""tokensync.auth and tokensync.stores against a real OAuth2 server (django-oauth-toolkit).

Each grant and client authentication method, refresh-token rotation with reuse
protection, and the error classification, as an application using the library sees them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import httpx
import pytest

from tokensync.auth import (
    AsyncTokenManager,
    ClientCredentialsAuth,
    InvalidClientError,
    InvalidGrantError,
    PasswordAuth,
    ReauthenticationRequired,
    RefreshTokenAuth,
    TokenManager,
    UnauthorizedClientError,
)
from tokensync.stores import AsyncRedisStore, FileStore, MemoryStore


def manager(idp, provider, **kwargs):
    return TokenManager(provider, http=httpx.Client(timeout=10), token_url=idp.token_url, **kwargs)


def active(idp, header: str) -> bool:
    return idp.introspect(header.split(" ", 1)[1])["active"] is True


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda idp: ClientCredentialsAuth("cc-client", idp.client_secret("cc-client")), id="basic"),
        pytest.param(
            lambda idp: ClientCredentialsAuth("cc-client", idp.client_secret("cc-client"), method="client_secret_post"),
            id="post",
        ),
        pytest.param(
            lambda idp: ClientCredentialsAuth("jwt-rs-client", private_key=idp.jwt_rs_private_key_pem), id="jwt-rs256"
        ),
        pytest.param(
            lambda idp: ClientCredentialsAuth(
                "jwt-es-client", private_key=idp.jwt_es_private_key_pem, signing_algorithm="ES256"
            ),
            id="jwt-es256",
        ),
        pytest.param(lambda idp: PasswordAuth("alice", idp.password("alice"), client_id="public-client"), id="public"),
        pytest.param(
            lambda idp: PasswordAuth(
                "alice", idp.password("alice"), client_id="pw-client", client_secret=idp.client_secret("pw-client")
            ),
            id="password-confidential",
        ),
        pytest.param(
            lambda idp: PasswordAuth(
                "bob",
                idp.password("bob"),
                totp=idp.users["bob"].totp_seed.get_secret_value(),
                client_id="pw-client",
                client_secret=idp.client_secret("pw-client"),
            ),
            id="password-totp-seed",
        ),
    ],
)
def test_each_grant_and_client_authentication_gets_an_active_token(idp, build):
    tm = manager(idp, build(idp))
    header = tm.authorization_header()
    assert header.startswith("Bearer ")
    assert active(idp, header)
    # A second private_key_jwt grant needs a fresh assertion (the server keeps a jti replay cache).
    assert active(idp, tm.force_refresh().authorization_header)


def test_refresh_rotates_and_the_rotated_token_is_stored(idp):
    store = MemoryStore()
    provider = PasswordAuth(
        "alice", idp.password("alice"), client_id="pw-client", client_secret=idp.client_secret("pw-client")
    )
    tm = manager(idp, provider, store=store)
    first = tm.token()
    idp.reset_counters()
    second = tm.force_refresh()
    assert idp.token_request_count("pw-client", "refresh_token") == 1
    assert second.refresh_token != first.refresh_token
    assert store.load() == second
    assert active(idp, second.authorization_header)


def test_a_reused_rotated_refresh_token_is_rejected_and_a_password_provider_recovers(make_idp):
    idp = make_idp(fresh=True)
    provider = PasswordAuth(
        "alice", idp.password("alice"), client_id="pw-client", client_secret=idp.client_secret("pw-client")
    )
    tm = manager(idp, provider)
    stale = tm.token()
    tm.force_refresh()  # rotates: the first refresh token is now spent
    # Someone (a second process with an old copy) presents the spent token.
    replay = manager(idp, provider, store=MemoryStore())
    replay._current = stale  # what an out-of-date copy would hold
    idp.reset_counters()
    recovered = replay.force_refresh()
    assert idp.token_request_count("pw-client", "refresh_token") == 1
    assert idp.token_request_count("pw-client", "password") == 1
    assert active(idp, recovered.authorization_header)


def test_a_spent_bootstrap_refresh_token_requires_reauthentication(make_idp):
    idp = make_idp(fresh=True)
    bootstrap = httpx.post(
        idp.token_url,
        data={"grant_type": "password", "username": "alice", "password": idp.password("alice")},
        auth=("pw-client", idp.client_secret("pw-client")),
    ).json()["refresh_token"]
    provider = RefreshTokenAuth(bootstrap, client_id="pw-client", client_secret=idp.client_secret("pw-client"))
    first = manager(idp, provider)
    assert active(idp, first.authorization_header())  # rotated: bootstrap is spent
    second = manager(idp, provider)  # a fresh process that only has the bootstrap token
    with pytest.raises(ReauthenticationRequired) as info:
        second.token()
    assert info.value.error == "invalid_grant"
    assert bootstrap not in str(info.value)


def test_wrong_client_secret_is_invalid_client(idp):
    with pytest.raises(InvalidClientError) as info:
        manager(idp, ClientCredentialsAuth("cc-client", "test-secret-wrong")).token()
    assert info.value.status_code == 401
    assert "test-secret-wrong" not in str(info.value)


def test_wrong_password_is_invalid_grant(idp):
    provider = PasswordAuth("alice", "test-secret-wrong-password", client_id="public-client")
    with pytest.raises(InvalidGrantError) as info:
        manager(idp, provider).token()
    assert "test-secret-wrong-password" not in str(info.value)


def test_a_grant_the_client_may_not_use_is_unauthorized_client(idp):
    with pytest.raises(UnauthorizedClientError):
        manager(idp, PasswordAuth("alice", idp.password("alice"), client_id="cc-client",
                                  client_secret=idp.client_secret("cc-client"))).token()  # fmt: skip


def test_ten_threads_make_one_request_to_a_real_server(make_idp):
    idp = make_idp(fresh=True)
    tm = manager(idp, ClientCredentialsAuth("cc-client", idp.client_secret("cc-client")))
    barrier = threading.Barrier(10)
    headers: list[str] = []

    def call() -> None:
        barrier.wait()
        headers.append(tm.authorization_header())

    threads = [threading.Thread(target=call) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert idp.token_request_count("cc-client") == 1
    assert len(set(headers)) == 1


async def test_async_manager_with_a_redis_store_survives_a_restart(idp, redis_url):
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    provider = PasswordAuth(
        "alice", idp.password("alice"), client_id="pw-client", client_secret=idp.client_secret("pw-client")
    )
    store = AsyncRedisStore.for_tokens(client, "tokensync:test:alice", ttl_seconds=600)
    async with httpx.AsyncClient() as http:
        first = AsyncTokenManager(provider, http=http, token_url=idp.token_url, store=store)
        headers = await asyncio.gather(*(first.authorization_header() for _ in range(10)))
        assert len(set(headers)) == 1
        idp.reset_counters()
        restarted = AsyncTokenManager(provider, http=http, token_url=idp.token_url, store=store)
        assert await restarted.authorization_header() == headers[0]
        assert idp.token_request_count() == 0
    await client.aclose()


def test_a_cli_login_in_a_file_store_survives_across_processes(idp, tmp_path):
    path = tmp_path / "login" / "token.json"
    script = (
        "import httpx, sys\n"
        "from tokensync.auth import PasswordAuth, TokenManager\n"
        "from tokensync.stores import FileStore\n"
        "tm = TokenManager(PasswordAuth('alice', sys.argv[2], client_id='public-client'), http=httpx.Client(),"
        " token_url=sys.argv[1], store=FileStore.for_tokens(sys.argv[3]))\n"
        "print(tm.authorization_header() == tm.authorization_header())\n"
    )
    run = [sys.executable, "-c", script, idp.token_url, idp.password("alice"), str(path)]
    idp.reset_counters()
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert idp.token_request_count("public-client") == 1
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = FileStore.for_tokens(path).load()
    assert loaded is not None and active(idp, loaded.authorization_header)
