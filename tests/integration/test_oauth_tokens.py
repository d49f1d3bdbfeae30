"""TokenService against a real loopback authorization server: refresh, single flight, rotation,
errors, and service accounts (Google JWT-bearer per mailbox, Microsoft app-only shared)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.accounts.grants import GrantClient
from gateway.accounts.registry import AccountRegistry
from gateway.accounts.tokens import TokenService
from gateway.config import Config
from gateway.crm.accounts import DBTokenStore
from gateway.crm.store import Store
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.keys.tokens import TokenCipher
from tests.conftest import free_port
from tests.support.oauth_server import TokenServer

pytestmark = pytest.mark.integration


@pytest.fixture
def ts() -> Iterator[TokenServer]:
    with TokenServer(access_lifetime=3600) as server:
        yield server


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    try:
        yield s
    finally:
        await s.close()


class Env:
    """A config of oauth2 accounts on `ts` (refresh tokens in files), the registry and tokens."""

    def __init__(self, tmp: Path, ts: TokenServer, store: Store, now: list[float]) -> None:
        self.tmp, self.ts, self.store, self.now = tmp, ts, store, now
        (tmp / "client-secret").write_text(ts.client_secret + "\n")
        self.accounts: list[dict[str, Any]] = []
        self.service_accounts: list[dict[str, Any]] = []
        self.cfg = Config()
        cipher = TokenCipher(TokenCipher.generate_key())
        self.registry = AccountRegistry(lambda: self.cfg, store, cipher)
        self.tokens = TokenService(lambda: self.cfg, self.registry, DBTokenStore(store), cipher,
                                   GrantClient(clock=lambda: now[0]), clock=lambda: now[0])

    def oauth2(self, ident: str, refresh: str, *, secret: str = "client-secret",
               url: str | None = None) -> None:
        (self.tmp / f"rt-{ident}").write_text(refresh + "\n")
        if secret != "client-secret":
            (self.tmp / secret).write_text(secret + "\n")
        self.accounts.append({
            "id": ident, "email": f"{ident}@example.test",
            "imap": {"host": "127.0.0.1", "port": 993},
            "auth": {"method": "oauth2", "token_endpoint": url or self.ts.token_url,
                     "client_id": self.ts.client_id, "client_secret_file": secret,
                     "refresh_token_file": f"rt-{ident}"}})
        self.load()

    def load(self) -> None:
        self.cfg = Config.model_validate({"accounts": self.accounts,
                                          "service_accounts": self.service_accounts,
                                          "source": str(self.tmp / "gateway.yaml")})


@pytest.fixture
async def env(tmp_path: Path, ts: TokenServer, sqlite: Store) -> AsyncIterator[Env]:
    e = Env(tmp_path, ts, sqlite, [time.time()])   # JWT assertions carry real times
    try:
        yield e
    finally:
        await e.tokens.close()


async def test_refresh_once_then_cached_encrypted_then_refreshed_before_expiry(env: Env) -> None:
    ts = env.ts
    env.oauth2("a", ts.issue_refresh_token("a@example.test"))
    tm = env.tokens
    first = await tm.access_token("a")
    assert await tm.access_token("a") == first
    assert len(ts.grants) == 1 and ts.grants[0]["grant_type"] == "refresh_token"
    saved = await DBTokenStore(env.store).load("a")
    assert saved is not None and first.encode() not in saved.ciphertext
    assert saved.expires_at == pytest.approx(env.now[0] + 3600)
    env.now[0] += 3600 - 299                    # inside the 5 minute margin
    second = await tm.access_token("a")
    assert second != first and len(ts.grants) == 2
    third = await tm.access_token("a", rejected=second)   # the server refused it
    assert third != second and len(ts.grants) == 3
    assert await tm.access_token("a", rejected=second) == third  # already replaced
    assert len(ts.grants) == 3


async def test_concurrent_callers_share_one_refresh(env: Env) -> None:
    ts = env.ts
    env.oauth2("a", ts.issue_refresh_token("a@example.test"))
    env.oauth2("b", ts.issue_refresh_token("b@example.test"))
    tokens = await asyncio.gather(*(env.tokens.access_token("a") for _ in range(10)))
    assert len(set(tokens)) == 1 and len(ts.grants) == 1
    other = await env.tokens.access_token("b")
    assert other != tokens[0] and len(ts.grants) == 2


async def test_a_rotated_refresh_token_is_kept_and_used(env: Env) -> None:
    ts = env.ts
    original = ts.issue_refresh_token("a@example.test")
    env.oauth2("a", original)
    rotated = ts.issue_refresh_token("a@example.test")
    ts.fail_next(200, {"access_token": "at-x", "expires_in": 3600, "refresh_token": rotated})
    assert await env.tokens.access_token("a") == "at-x"
    ts.revoke_refresh_token(original)        # the endpoint retired the old one
    env.now[0] += 4000
    await env.tokens.access_token("a")
    assert ts.grants[-1]["refresh_token"] == rotated
    # the admin reconnected the account: a new configured refresh token wins
    fresh = ts.issue_refresh_token("a@example.test")
    (env.tmp / "rt-a").write_text(fresh)
    await env.tokens.access_token("a", rejected="anything")
    assert ts.grants[-1]["refresh_token"] == fresh


async def test_refusals_need_reconnect_and_outages_are_temporary(env: Env) -> None:
    ts = env.ts
    env.oauth2("unknown", "rt-unknown")
    with pytest.raises(AccountAuthError) as err:
        await env.tokens.access_token("unknown")
    assert err.value.server_text.startswith("invalid_grant: Token has been expired or revoked")
    env.oauth2("badclient", ts.issue_refresh_token("a@x"), secret="wrong")
    with pytest.raises(AccountAuthError) as err:
        await env.tokens.access_token("badclient")
    assert "invalid_client" in err.value.server_text

    env.oauth2("good", ts.issue_refresh_token("a@example.test"))
    ts.fail_next(503, {"error": "temporarily_unavailable"})
    with pytest.raises(AccountUnavailable) as unavailable:
        await env.tokens.access_token("good")
    assert unavailable.value.temporary
    ts.fail_next(200, {"token_type": "Bearer"})       # no access_token in a 200
    with pytest.raises(AccountUnavailable):
        await env.tokens.access_token("good")
    assert await env.tokens.access_token("good")       # and then it works
    env.oauth2("gone", "rt", url=f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(AccountUnavailable):
        await env.tokens.access_token("gone")
    with pytest.raises(AccountAuthError, match="no account"):
        await env.tokens.access_token("nobody")


async def test_google_service_account_serves_three_mailboxes_each_with_its_own_token(env: Env) -> None:
    ts = env.ts
    key = ts.create_service_account(domains=("example.test",))
    (env.tmp / "sa.json").write_text(json.dumps(key))
    env.service_accounts.append({"id": "workspace", "kind": "google", "key_file": "sa.json"})
    for rep in ("ann", "ben", "cat"):
        env.accounts.append({"id": rep, "email": f"{rep}@example.test", "provider": "gmail",
                             "auth": {"method": "service", "service_account": "workspace"}})
    env.load()
    tokens = {rep: await env.tokens.access_token(rep) for rep in ("ann", "ben", "cat")}
    assert len(set(tokens.values())) == 3
    for rep, token in tokens.items():
        assert ts.token_allows(token, f"{rep}@example.test")
        assert not ts.token_allows(token, "ann@example.test" if rep != "ann" else "ben@example.test")
    bearer = [g for g in ts.grants if g["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert len(bearer) == 3
    assert await env.tokens.access_token("ann") == tokens["ann"]        # cached
    # a mailbox outside the delegated domain is refused: that account needs attention
    env.accounts.append({"id": "out", "email": "out@elsewhere.test", "provider": "gmail",
                         "auth": {"method": "service", "service_account": "workspace"}})
    env.load()
    with pytest.raises(AccountAuthError):
        await env.tokens.access_token("out")


async def test_microsoft_app_only_token_is_shared_by_the_service_accounts_mailboxes(env: Env) -> None:
    ts = env.ts
    ts.register_client("m365-app", "app-secret")
    ts.grant_mailboxes("m365-app", "ann@example.test", "ben@example.test", "cat@example.test")
    (env.tmp / "app-secret").write_text("app-secret\n")
    env.service_accounts.append({"id": "m365", "kind": "microsoft", "tenant": "example.test",
                                 "client_id": "m365-app", "client_secret_file": "app-secret",
                                 "token_endpoint": ts.token_url})
    for rep in ("ann", "ben", "cat"):
        env.accounts.append({"id": rep, "email": f"{rep}@example.test", "provider": "microsoft365",
                             "auth": {"method": "service", "service_account": "m365"}})
    env.load()
    got = await asyncio.gather(*(env.tokens.access_token(rep) for rep in ("ann", "ben", "cat")))
    assert len(set(got)) == 1
    assert [g["grant_type"] for g in ts.grants] == ["client_credentials"]
    assert all(ts.token_allows(got[0], f"{rep}@example.test") for rep in ("ann", "ben", "cat"))
    again = await env.tokens.access_token("ben", rejected=got[0])
    assert again != got[0] and len(ts.grants) == 2
    (env.tmp / "app-secret").write_text("wrong\n")
    env.now[0] += 7200
    with pytest.raises(AccountAuthError):
        await env.tokens.access_token("ann")
