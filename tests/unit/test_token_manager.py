"""TokenManager / AsyncTokenManager behaviour against a scripted token endpoint."""

import asyncio
import threading
from datetime import timedelta

import httpx
import pytest
from pydantic import SecretStr

from support.fake_idp import TOKEN_URL, FakeIdP, oauth_error, process_then_lose, refuse_connection, respond
from tokensync.auth import (
    AsyncTokenManager,
    ClientCredentialsAuth,
    EndpointUnreachableError,
    PasswordAuth,
    RateLimitedError,
    ReauthenticationRequired,
    RefreshTokenAuth,
    ResponseLostError,
    Superseded,
    TokenManager,
    TokenSet,
)
from tokensync.models import utcnow


class ListStore:
    """A store that records every save, to check what was persisted and when."""

    def __init__(self, value: TokenSet | None = None, fail_saves: bool = False) -> None:
        self.value = value
        self.saved: list[TokenSet] = []
        self.fail_saves = fail_saves

    def load(self):
        return self.value

    def save(self, value):
        if self.fail_saves:
            raise OSError("disk full")
        self.saved.append(value)
        self.value = value

    def clear(self):
        self.value = None


class AsyncListStore(ListStore):
    async def load(self):  # type: ignore[override]
        return self.value

    async def save(self, value):  # type: ignore[override]
        ListStore.save(self, value)

    async def clear(self):  # type: ignore[override]
        self.value = None


def expired(refresh: str | None = "refresh-0") -> TokenSet:
    return TokenSet(
        access_token=SecretStr("old-access"),
        refresh_token=SecretStr(refresh) if refresh else None,
        issued_at=utcnow() - timedelta(hours=2),
        expires_at=utcnow() - timedelta(hours=1),
    )


def manager(idp, provider=None, store=None, **kwargs):
    provider = provider or PasswordAuth("alice", "test-secret-pw")
    return TokenManager(
        provider, http=httpx.Client(transport=idp.transport()), token_url=TOKEN_URL, store=store, **kwargs
    )


def test_first_call_grants_and_later_calls_reuse_the_token():
    idp = FakeIdP()
    tm = manager(idp)
    assert tm.authorization_header() == "Bearer access-1"
    assert tm.authorization_header() == "Bearer access-1"
    assert len(idp.requests) == 1
    assert idp.requests[0]["grant_type"] == "password"


def test_a_valid_stored_token_is_used_without_any_request():
    idp = FakeIdP()
    stored = TokenSet.from_response({"access_token": "stored", "expires_in": 600})
    tm = manager(idp, store=ListStore(stored))
    assert tm.authorization_header() == "Bearer stored"
    assert idp.requests == []


def test_expired_token_is_refreshed_with_the_refresh_token_and_rotation_is_saved():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    store = ListStore(expired())
    tm = manager(idp, store=store)
    token = tm.token()
    assert idp.grants() == [{"grant_type": "refresh_token", "refresh_token": "refresh-0", "client_id": "tokensync"}]
    assert token.refresh_token is not None and token.refresh_token.get_secret_value() == "refresh-1"
    assert store.value == token


def test_token_inside_expiry_skew_is_renewed_early():
    idp = FakeIdP(lifetime=20)
    tm = manager(idp, expiry_skew=30)
    tm.token()
    tm.token()
    assert len(idp.requests) == 2


def test_a_slow_answer_does_not_stretch_the_token_past_the_idps_expiry():
    """expires_in counts from issuance, before the answer arrived: the wait is not added to it."""
    idp = FakeIdP(lifetime=60, delay=0.3)
    before = utcnow()
    token = manager(idp).token()
    assert token.expires_at is not None
    assert token.expires_at - before < timedelta(seconds=60.1), token.expires_at - before


async def test_a_slow_answer_does_not_stretch_the_token_past_the_idps_expiry_async():
    tm = async_manager(FakeIdP(lifetime=60), delay=0.3)
    before = utcnow()
    token = await tm.token()
    assert token.expires_at is not None
    assert token.expires_at - before < timedelta(seconds=60.1), token.expires_at - before


def test_a_server_that_does_not_rotate_leaves_the_old_refresh_token_usable():
    idp = FakeIdP(rotate=False, valid_refresh={"refresh-0"})
    store = ListStore(expired())
    token = manager(idp, store=store).token()
    assert token.refresh_token is not None and token.refresh_token.get_secret_value() == "refresh-0"


def test_rejected_refresh_token_falls_back_to_a_full_grant():
    idp = FakeIdP()  # knows no refresh token: invalid_grant
    tm = manager(idp, store=ListStore(expired()))
    assert tm.authorization_header() == "Bearer access-1"
    assert [r["grant_type"] for r in idp.requests] == ["refresh_token", "password"]


def test_rejected_refresh_token_without_credentials_requires_reauthentication():
    idp = FakeIdP()
    store = ListStore(expired())
    tm = manager(idp, provider=RefreshTokenAuth("test-secret-bootstrap"), store=store)
    with pytest.raises(ReauthenticationRequired, match="new refresh token is required"):
        tm.token()
    assert len(idp.requests) == 1


def test_rejected_bootstrap_refresh_token_requires_reauthentication():
    idp = FakeIdP()
    tm = manager(idp, provider=RefreshTokenAuth("test-secret-bootstrap"))
    with pytest.raises(ReauthenticationRequired) as info:
        tm.token()
    assert "test-secret" not in str(info.value)


def test_bootstrap_refresh_token_starts_a_rotating_chain():
    idp = FakeIdP(lifetime=1, valid_refresh={"test-secret-bootstrap"})
    store = ListStore()
    tm = manager(idp, provider=RefreshTokenAuth("test-secret-bootstrap"), store=store, expiry_skew=5)
    tm.token()
    tm.token()  # lifetime 1 < skew: renews with the rotated token, not the bootstrap one
    assert [r["refresh_token"] for r in idp.requests] == ["test-secret-bootstrap", "refresh-1"]


def test_lost_refresh_response_is_not_retried_with_the_same_refresh_token():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    idp.script.append(process_then_lose(idp))
    store = ListStore(expired())
    tm = manager(idp, store=store)
    token = tm.token()
    presented = [r.get("refresh_token") for r in idp.requests]
    assert presented.count("refresh-0") == 1
    assert [r["grant_type"] for r in idp.requests] == ["refresh_token", "password"]
    # The spent refresh token was persisted as spent before the new grant.
    assert store.saved[0].refresh_token is None
    assert store.value == token


def test_lost_refresh_response_without_credentials_keeps_the_only_refresh_token():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    idp.script.append(process_then_lose(idp))
    store = ListStore(expired())
    tm = manager(idp, provider=RefreshTokenAuth("test-secret-bootstrap"), store=store)
    with pytest.raises(ResponseLostError):
        tm.token()
    assert store.value is not None and store.value.refresh_token is not None
    assert store.value.refresh_token.get_secret_value() == "refresh-0"


def test_unreachable_endpoint_keeps_the_refresh_token_for_the_next_attempt():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    idp.script.append(refuse_connection)
    store = ListStore(expired())
    tm = manager(idp, store=store)
    with pytest.raises(EndpointUnreachableError):
        tm.token()
    assert tm.token().access_token.get_secret_value() == "access-1"
    assert [r["grant_type"] for r in idp.requests] == ["refresh_token", "refresh_token"]


def test_rate_limit_surfaces_with_retry_after():
    idp = FakeIdP()
    idp.script.append(respond(oauth_error(429, "slow_down", **{"Retry-After": "30"})))
    with pytest.raises(RateLimitedError) as info:
        manager(idp, provider=ClientCredentialsAuth("c", "test-secret-c")).token()
    assert info.value.retry_after == 30


def test_no_token_is_returned_unless_it_was_saved():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    tm = manager(idp, store=ListStore(expired(), fail_saves=True))
    with pytest.raises(OSError, match="disk full"):
        tm.token()


def test_a_token_the_store_refused_is_saved_before_it_is_served_later():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    store = ListStore(expired(), fail_saves=True)
    tm = manager(idp, store=store)
    with pytest.raises(OSError, match="disk full"):
        tm.token()
    with pytest.raises(OSError, match="disk full"):
        tm.authorization_header()
    store.fail_saves = False
    assert tm.authorization_header() == "Bearer access-1"
    assert store.value is not None and store.value.access_token.get_secret_value() == "access-1"
    assert len(idp.requests) == 1  # the rotated token was kept, not re-requested


def test_force_refresh_renews_a_token_that_still_looks_valid():
    idp = FakeIdP()
    tm = manager(idp)
    first = tm.token()
    second = tm.force_refresh()
    assert first.access_token != second.access_token
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token"]


def test_clear_forgets_memory_and_store():
    idp = FakeIdP()
    store = ListStore()
    tm = manager(idp, store=store)
    tm.token()
    tm.clear()
    assert store.value is None and tm.token_set is None
    tm.token()
    assert [r["grant_type"] for r in idp.requests] == ["password", "password"]


def test_ten_threads_on_an_expired_token_make_exactly_one_request():
    idp = FakeIdP(valid_refresh={"refresh-0"}, delay=0.05)
    tm = manager(idp, store=ListStore(expired()))
    barrier = threading.Barrier(10)
    headers: list[str] = []

    def call():
        barrier.wait()
        headers.append(tm.authorization_header())

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(idp.requests) == 1
    assert headers == ["Bearer access-1"] * 10


def test_a_burst_of_401s_renews_once():
    idp = FakeIdP(delay=0.05)
    tm = manager(idp)
    tm.token()
    barrier = threading.Barrier(10)
    threads = [threading.Thread(target=lambda: (barrier.wait(), tm.force_refresh())) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token"]


def async_manager(idp, provider=None, store=None, delay=0.0):
    async def handler(request):
        if delay:
            await asyncio.sleep(delay)
        return idp(request)

    provider = provider or PasswordAuth("alice", "test-secret-pw")
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AsyncTokenManager(provider, http=http, token_url=TOKEN_URL, store=store)


async def test_ten_tasks_on_an_expired_token_make_exactly_one_request():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    store = AsyncListStore(expired())
    tm = async_manager(idp, store=store, delay=0.05)
    headers = await asyncio.gather(*(tm.authorization_header() for _ in range(10)))
    assert len(idp.requests) == 1
    assert set(headers) == {"Bearer access-1"}
    assert store.value is not None and store.value.refresh_token is not None
    assert store.value.refresh_token.get_secret_value() == "refresh-1"


async def test_async_lost_response_reauthenticates_without_reuse():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    idp.script.append(process_then_lose(idp))
    tm = async_manager(idp, store=AsyncListStore(expired()))
    await tm.token()
    assert [r.get("refresh_token") for r in idp.requests].count("refresh-0") == 1


async def test_async_burst_of_401s_renews_once_and_clear_forgets():
    idp = FakeIdP()
    store = AsyncListStore()
    tm = async_manager(idp, store=store, delay=0.05)
    await tm.token()
    await asyncio.gather(*(tm.force_refresh() for _ in range(5)))
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token"]
    await tm.clear()
    assert store.value is None


async def test_async_reauthentication_required():
    idp = FakeIdP()
    tm = async_manager(idp, provider=RefreshTokenAuth("test-secret-bootstrap"))
    with pytest.raises(ReauthenticationRequired):
        await tm.token()


def test_manager_repr_shows_no_secrets():
    tm = manager(FakeIdP(), provider=ClientCredentialsAuth("c", "test-secret-c"))
    tm.token()
    assert "test-secret" not in repr(tm)
    assert "access-1" not in repr(tm.token_set)


# -- serving from memory while the store is down (the operator's choice) -------------------------


def test_serve_unsaved_serves_the_new_token_and_keeps_retrying_the_save():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    store = ListStore(expired(), fail_saves=True)
    tm = manager(idp, store=store, serve_unsaved=True)
    assert tm.authorization_header() == "Bearer access-1"
    assert tm.pending_save and isinstance(tm.store_error, OSError)
    assert tm.authorization_header() == "Bearer access-1"  # served again, not re-requested
    store.fail_saves = False
    assert tm.authorization_header() == "Bearer access-1"
    assert not tm.pending_save and tm.store_error is None
    assert store.value is not None and store.value.refresh_token is not None
    assert store.value.refresh_token.get_secret_value() == "refresh-1"
    assert len(idp.requests) == 1


class UnreadableStore(ListStore):
    def __init__(self, value):
        super().__init__(value)
        self.down = False

    def load(self):
        if self.down:
            raise OSError("store down")
        return self.value


def test_serve_unsaved_refreshes_from_memory_when_the_store_cannot_be_read():
    idp = FakeIdP(valid_refresh={"refresh-0", "refresh-1"})
    store = UnreadableStore(expired())
    tm = manager(idp, store=store, serve_unsaved=True)
    tm.token()
    store.down = store.fail_saves = True
    renewed = tm.force_refresh()  # uses refresh-1, held in memory
    assert renewed.access_token.get_secret_value() == "access-2"
    assert [r.get("refresh_token") for r in idp.requests] == ["refresh-0", "refresh-1"]


def test_without_serve_unsaved_an_unreadable_store_still_fails_loudly():
    store = UnreadableStore(expired())
    store.down = True
    with pytest.raises(OSError, match="store down"):
        manager(FakeIdP(), store=store).token()


# -- another process won the race: adopt its token set ---------------------------------------------


class RacingStore(ListStore):
    """A compare-and-swap store whose first save loses to another process."""

    def __init__(self, value, winner):
        super().__init__(value)
        self.winner = winner

    def save(self, value):
        if self.winner is not None:
            winner, self.winner = self.winner, None
            self.value = winner
            raise Superseded(winner)
        super().save(value)


def winner_tokens() -> TokenSet:
    return TokenSet(
        access_token=SecretStr("winner-access"),
        refresh_token=SecretStr("winner-refresh"),
        issued_at=utcnow(),
        expires_at=utcnow() + timedelta(hours=1),
    )


def test_a_superseded_save_serves_the_winners_token_set():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    store = RacingStore(expired(), winner_tokens())
    tm = manager(idp, store=store)
    assert tm.authorization_header() == "Bearer winner-access"
    assert tm.authorization_header() == "Bearer winner-access"
    assert len(idp.requests) == 1
    assert not tm.pending_save
    # The next renewal continues the winner's chain, not the loser's.
    idp.valid_refresh.add("winner-refresh")
    tm.force_refresh()
    assert idp.requests[-1].get("refresh_token") == "winner-refresh"


async def test_async_superseded_save_serves_the_winners_token_set():
    idp = FakeIdP(valid_refresh={"refresh-0"})
    winner = winner_tokens()

    class AsyncRacingStore(AsyncListStore):
        async def save(self, value):  # type: ignore[override]
            nonlocal winner
            if winner is not None:
                won, winner = winner, None
                self.value = won
                raise Superseded(won)
            ListStore.save(self, value)

    tm = async_manager(idp, store=AsyncRacingStore(expired()))
    assert await tm.authorization_header() == "Bearer winner-access"
    assert len(idp.requests) == 1
