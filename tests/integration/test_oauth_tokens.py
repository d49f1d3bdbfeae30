"""TokenManager against a real loopback token endpoint: refresh, single flight, rotation, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.imap.oauth import MemoryTokenStore, OAuthCredentials, TokenCipher, TokenManager
from tests.conftest import free_port
from tests.support.oauth_server import TokenServer

pytestmark = pytest.mark.integration


@pytest.fixture
def ts() -> Iterator[TokenServer]:
    with TokenServer(access_lifetime=3600) as server:
        yield server


def creds(ts: TokenServer, refresh: str, **kw: str) -> OAuthCredentials:
    return OAuthCredentials(token_endpoint=kw.pop("url", ts.token_url), client_id=ts.client_id,
                            client_secret=kw.pop("secret", ts.client_secret), refresh_token=refresh)


def manager(clock: list[float] | None = None) -> tuple[TokenManager, MemoryTokenStore]:
    store = MemoryTokenStore()
    now = clock or [1_000_000.0]
    return TokenManager(store, TokenCipher(TokenCipher.generate_key()), clock=lambda: now[0]), store


async def test_refresh_once_then_cached_encrypted_then_refreshed_before_expiry(ts: TokenServer) -> None:
    now = [1_000_000.0]
    tm, store = manager(now)
    c = creds(ts, ts.issue_refresh_token("a@example.test"))
    try:
        first = await tm.access_token("a", c)
        assert await tm.access_token("a", c) == first
        assert len(ts.grants) == 1
        assert ts.grants[0]["grant_type"] == "refresh_token"
        saved = store.tokens["a"]
        assert first.encode() not in saved.ciphertext
        assert saved.expires_at == pytest.approx(now[0] + 3600)
        now[0] += 3600 - 299                    # inside the 5 minute margin
        second = await tm.access_token("a", c)
        assert second != first and len(ts.grants) == 2
        third = await tm.access_token("a", c, rejected=second)   # the server refused it
        assert third != second and len(ts.grants) == 3
        assert await tm.access_token("a", c, rejected=second) == third  # already replaced
        assert len(ts.grants) == 3
    finally:
        await tm.close()


async def test_concurrent_callers_share_one_refresh(ts: TokenServer) -> None:
    tm, _ = manager()
    c = creds(ts, ts.issue_refresh_token("a@example.test"))
    try:
        tokens = await asyncio.gather(*(tm.access_token("a", c) for _ in range(10)))
        assert len(set(tokens)) == 1 and len(ts.grants) == 1
        other = await tm.access_token("b", creds(ts, ts.issue_refresh_token("b@example.test")))
        assert other != tokens[0] and len(ts.grants) == 2
    finally:
        await tm.close()


async def test_a_rotated_refresh_token_is_kept_and_used(ts: TokenServer) -> None:
    now = [1_000_000.0]
    tm, _ = manager(now)
    original = ts.issue_refresh_token("a@example.test")
    c = creds(ts, original)
    rotated = ts.issue_refresh_token("a@example.test")
    ts.fail_next(200, {"access_token": "at-x", "expires_in": 3600, "refresh_token": rotated})
    try:
        assert await tm.access_token("a", c) == "at-x"
        ts.revoke_refresh_token(original)        # the endpoint retired the old one
        now[0] += 4000
        await tm.access_token("a", c)
        assert ts.grants[-1]["refresh_token"] == rotated
        # the admin reconnected the account: a new configured refresh token wins
        fresh = ts.issue_refresh_token("a@example.test")
        await tm.access_token("a", creds(ts, fresh), rejected="anything")
        assert ts.grants[-1]["refresh_token"] == fresh
    finally:
        await tm.close()


async def test_refusals_need_reconnect_and_outages_are_temporary(ts: TokenServer) -> None:
    tm, _ = manager()
    try:
        with pytest.raises(AccountAuthError) as err:
            await tm.access_token("a", creds(ts, "rt-unknown"))
        assert err.value.server_text.startswith("invalid_grant: Token has been expired or revoked")
        with pytest.raises(AccountAuthError) as err:
            await tm.access_token("a", creds(ts, ts.issue_refresh_token("a@x"), secret="wrong"))
        assert "invalid_client" in err.value.server_text

        good = creds(ts, ts.issue_refresh_token("a@example.test"))
        ts.fail_next(503, {"error": "temporarily_unavailable"})
        with pytest.raises(AccountUnavailable) as unavailable:
            await tm.access_token("a", good)
        assert unavailable.value.temporary
        ts.fail_next(200, {"token_type": "Bearer"})       # no access_token in a 200
        with pytest.raises(AccountUnavailable):
            await tm.access_token("a", good)
        assert await tm.access_token("a", good)           # and then it works
        with pytest.raises(AccountUnavailable):
            await tm.access_token("z", creds(ts, "rt", url=f"http://127.0.0.1:{free_port()}/token"))
    finally:
        await tm.close()
