"""Accounts created while the daemon runs: through the API (password, service account), a connect
link (authorization code + PKCE against the test OAuth server), synced from Dovecot without a
restart; changed, tested and deleted with purge through the API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.accounts.connect import account_id_for
from gateway.app import App
from tests.conftest import free_port, require_tool
from tests.integration.harness import PASSWORD, password_hash
from tests.integration.tailer_support import FAST_SYNC, add_contacts, new_user
from tests.support.cli import mailgw_in_process
from tests.support.dovecot import Dovecot, message
from tests.support.oauth_server import TokenServer
from tests.support.upstream import Upstream
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LEAD = "lead@customer.test"
SELLER = "seller@example.test"


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as ts:
        yield ts


@pytest.fixture(scope="module")
def dovecot(token_server: TokenServer) -> Iterator[Dovecot]:
    require_tool("dovecot")
    with Dovecot(tokeninfo_url=token_server.tokeninfo_url) as dc:
        yield dc


class Gateway:
    def __init__(self, app: App, session: aiohttp.ClientSession, upstream: Upstream,
                 smarthost: Upstream) -> None:
        self.app, self.session = app, session
        self.upstream, self.smarthost = upstream, smarthost
        assert app.admin is not None and app.tracking is not None
        self.api = f"http://127.0.0.1:{app.admin.port}"
        self.public = f"http://127.0.0.1:{app.tracking.port}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.api + path, json=body) as resp:
            return resp.status, await resp.json()

    async def page(self, url: str) -> tuple[int, str, str | None]:
        async with self.session.get(url, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp.headers.get("Location")

    async def messages(self, account: str) -> list[str]:
        status, body = await self.call("GET", f"/api/v1/messages?account={account}")
        assert status == 200
        return [m["message_id"] for m in body["messages"]]

    async def account(self, ident: str) -> dict[str, Any]:
        _, body = await self.call("GET", "/api/v1/accounts")
        return next(a for a in body["accounts"] if a["id"] == ident)


@pytest.fixture
async def gw(tmp_path: Path, token_server: TokenServer, dovecot: Dovecot) -> AsyncIterator[Gateway]:
    ts = token_server
    tracking_port = free_port()
    ts.register_redirect_uri(f"http://127.0.0.1:{tracking_port}/connect/callback")
    (tmp_path / "client-secret").write_text(ts.client_secret + "\n")
    (tmp_path / "app-secret").write_text("app-secret\n")
    ts.register_client("m365-app", "app-secret")
    (tmp_path / "sa.json").write_text(json.dumps(ts.create_service_account(domains=("example.test",))))
    async with Upstream(oauth=ts.token_allows) as upstream, Upstream() as smarthost:
        cfg = _config(tmp_path, ts, dovecot, tracking_port, upstream, smarthost)
        app = App(cfg)
        await app.start()
        try:
            async with aiohttp.ClientSession() as session:
                yield Gateway(app, session, upstream, smarthost)
        finally:
            await app.stop()


def _config(tmp_path: Path, ts: TokenServer, dovecot: Dovecot, tracking_port: int,
            upstream: Upstream, smarthost: Upstream) -> Any:
    from gateway.config import Config
    return Config.model_validate({
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "source": str(tmp_path / "gateway.yaml"),
        "listeners": {"submission": {"host": "127.0.0.1", "port": free_port()},
                      "tracking": {"host": "127.0.0.1", "port": tracking_port,
                                   "base_url": f"http://127.0.0.1:{tracking_port}"},
                      "admin": {"host": "127.0.0.1", "port": free_port()}},
        "users": [{"login": SELLER, "password_hash": password_hash()}],
        "delivery": {"route": "account", "retry": {"schedule": ["1s"], "give_up_after": "1h"},
                     "smarthost": {"host": "127.0.0.1", "port": smarthost.port, "tls": "none"}},
        "sync": dict(FAST_SYNC),
        "oauth": {"providers": {"testidp": {
            "issuer": ts.issuer, "authorization_endpoint": ts.authorize_url,
            "token_endpoint": ts.token_url, "jwks_uri": ts.jwks_url,
            "userinfo_endpoint": ts.userinfo_url, "client_id": ts.client_id,
            "client_secret_file": "client-secret", "scopes": ["mail", "openid", "email"],
            "revocation_endpoint": ts.revocation_url, "mail_provider": "imap",
            "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
            "smtp": {"host": "127.0.0.1", "port": upstream.port, "tls": "none"}}}},
        "service_accounts": [{"id": "workspace", "kind": "google", "key_file": "sa.json",
                              "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"}},
                             {"id": "m365", "kind": "microsoft", "tenant": "example.test",
                              "client_id": "m365-app", "client_secret_file": "app-secret",
                              "token_endpoint": ts.token_url,
                              "smtp": {"host": "127.0.0.1", "port": upstream.port, "tls": "none"}}],
        "accounts": [{"id": "declared", "email": "declared@example.test",
                      "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
                      "sync": {"enabled": False}}],
    })


def imap(dovecot: Dovecot) -> dict[str, Any]:
    return {"host": dovecot.host, "port": dovecot.port, "tls": "none"}


async def test_an_account_created_through_the_api_syncs_changes_tests_and_purges(
        gw: Gateway, dovecot: Dovecot) -> None:
    user = new_user(dovecot)
    assert gw.app.store is not None
    await add_contacts(gw.app.store, LEAD)
    dovecot.append(user, "INBOX", message("hello", sender=LEAD, to=user, message_id="<rt1@test>"))
    body = {"id": "rt1", "email": user, "imap": imap(dovecot),
            "auth": {"method": "password", "password": dovecot.users[user]},
            "sync": {"folders": ["INBOX"]}}
    status, created = await gw.call("POST", "/api/v1/accounts", body)
    assert status == 201, created
    assert (created["origin"], created["status"], created["folders"]) == ("runtime", "active", ["INBOX"])
    await wait_for(lambda: gw.messages("rt1"), 20, "the new account's INBOX synced without a restart")
    assert await gw.messages("rt1") == ["<rt1@test>"]
    # the password is stored encrypted, never returned
    assert dovecot.users[user] not in json.dumps(created)
    assert gw.app.store is not None
    async with gw.app.store.engine.connect() as conn:
        import sqlalchemy as sa
        blob = (await conn.execute(sa.text("SELECT credential_ciphertext FROM accounts "
                                           "WHERE id = 'rt1'"))).scalar()
    assert blob and dovecot.users[user].encode() not in bytes(blob)

    # bad input names the parameter; nothing is created
    status, err = await gw.call("POST", "/api/v1/accounts", {**body, "id": "rt2",
                                "auth": {"method": "password", "password_file": "/etc/shadow"}})
    assert status == 400 and err["parameter"] == "auth.password_file", err
    status, err = await gw.call("POST", "/api/v1/accounts", {**body, "id": "rt3", "sync": {"folders": []}})
    assert status == 400 and err["parameter"].startswith("sync.folders"), err
    status, err = await gw.call("POST", "/api/v1/accounts", body)
    assert status == 409
    status, err = await gw.call("POST", "/api/v1/accounts", {**body, "id": "declared"})
    assert status == 409 and "gateway.yaml" in err["error"]
    status, err = await gw.call("PATCH", "/api/v1/accounts/declared", {"folders": ["INBOX"]})
    assert status == 409

    status, changed = await gw.call("PATCH", "/api/v1/accounts/rt1",
                                    {"folders": ["INBOX", "Sent"], "history_days": 7})
    assert status == 200 and changed["folders"] == ["INBOX", "Sent"] and changed["history_days"] == 7
    status, report = await gw.call("POST", "/api/v1/accounts/rt1/test")
    assert status == 200 and report["ok"] is True, report
    assert [f["configured"] for f in report["folders"]] == ["INBOX", "Sent"]
    status, err = await gw.call("PATCH", "/api/v1/accounts/rt1", {"id": "other"})
    assert status == 400 and err["parameter"] == "id"
    # the stored password never goes to a new server; secrets are not steered elsewhere
    status, err = await gw.call("PATCH", "/api/v1/accounts/rt1",
                                {"imap": {"host": "127.0.0.2", "port": 1143, "tls": "none"}})
    assert status == 400 and err["parameter"] == "auth.password", err
    status, err = await gw.call("PATCH", "/api/v1/accounts/rt1",
                                {"imap": {"host": "imap.elsewhere.test", "port": 143, "tls": "none"},
                                 "auth": {"password": "x"}})
    assert status == 400 and err["parameter"] == "imap.tls", err
    status, err = await gw.call("PATCH", "/api/v1/accounts/rt1", {"sync": "x"})
    assert status == 400 and err["parameter"] == "sync"
    for steer, parameter in (
            ({"auth": {"method": "oauth2", "oauth_provider": "testidp", "refresh_token": "r",
                       "token_endpoint": "https://evil.test/token"}}, "auth.token_endpoint"),
            ({"auth": {"method": "service", "service_account": "workspace"},
              "imap": {"host": "127.0.0.9", "port": 993}}, "imap"),
            ({"auth": {"method": "service", "service_account": "workspace", "password": "x"}},
             "auth.password")):
        status, err = await gw.call("POST", "/api/v1/accounts", {"id": "steer", "email": user, **steer})
        assert status == 400 and err["parameter"] == parameter, (steer, err)

    status, gone = await gw.call("DELETE", "/api/v1/accounts/rt1?purge=true")
    assert status == 200 and gone["purged"]["messages"] == 1, gone
    assert await gw.messages("rt1") == []
    assert (await gw.account("rt1"))["status"] == "deleted"
    status, _ = await gw.call("DELETE", "/api/v1/accounts/nobody")
    assert status == 404


async def test_a_service_account_serves_three_mailboxes_added_at_run_time(
        gw: Gateway, dovecot: Dovecot, token_server: TokenServer) -> None:
    assert gw.app.store is not None
    await add_contacts(gw.app.store, LEAD)
    reps = [new_user(dovecot) for _ in range(3)]
    for i, rep in enumerate(reps):
        dovecot.append(rep, "INBOX", message(f"to rep {i}", sender=LEAD, to=rep,
                                             message_id=f"<sa{i}@test>"))
        status, created = await gw.call("POST", "/api/v1/accounts", {
            "id": f"sa{i}", "email": rep, "provider": "imap",
            "auth": {"method": "service", "service_account": "workspace"},
            "sync": {"folders": ["INBOX"]}})
        assert status == 201, created
        assert created["service_account"] == "workspace"
    for i in range(3):
        await wait_for(lambda i=i: gw.messages(f"sa{i}"), 20, f"mailbox sa{i} synced")  # type: ignore[misc]
        assert await gw.messages(f"sa{i}") == [f"<sa{i}@test>"]
    bearer = [g for g in token_server.grants
              if g["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert len(bearer) >= 3


async def test_a_connect_link_connects_a_mailbox_once(gw: Gateway, dovecot: Dovecot,
                                                      token_server: TokenServer) -> None:
    ts = token_server
    assert gw.app.store is not None
    await add_contacts(gw.app.store, LEAD)
    rep = new_user(dovecot)
    dovecot.append(rep, "INBOX", message("linked", sender=LEAD, to=rep, message_id="<cl@test>"))
    status, link = await gw.call("POST", "/api/v1/connect-links", {"provider": "testidp", "email": rep})
    assert status == 201 and link["url"].startswith(gw.public + "/connect/"), link

    # consent refused: a clear page, nothing connected, the link still usable
    status, _, where = await gw.page(link["url"])
    assert status == 302 and where is not None and where.startswith(ts.authorize_url)
    status, page, _ = await gw.page(ts.consent(where, email=rep, approve=False))
    assert status == 200 and 'data-kind="refused"' in page
    # another mailbox than the link's: refused, nothing changed
    status, _, where = await gw.page(link["url"])
    assert where is not None
    other = new_user(dovecot)
    status, page, _ = await gw.page(ts.consent(where, email=other))
    assert status == 409 and 'data-kind="mismatch"' in page
    _, accounts = await gw.call("GET", "/api/v1/accounts")
    assert not [a for a in accounts["accounts"] if a["email"] in (rep, other)]

    # a scanner opening the link first does not spoil the rep's sign-in: the same attempt,
    # even when the rep opens it a while later
    status, _, scanned = await gw.page(link["url"])
    assert gw.app.accounts is not None
    connect = gw.app.accounts.connect
    real_clock = connect.clock
    connect.clock = lambda: real_clock() + 30
    try:
        status, _, where = await gw.page(link["url"])
    finally:
        connect.clock = real_clock
    assert where is not None and scanned is not None
    assert _query(where)["state"] == _query(scanned)["state"]
    # a provider's error text is not shown on the gateway's page, only its code
    status, page, _ = await gw.page(f"{gw.public}/connect/callback?state={_query(where)['state']}"
                                    "&error=server_error&error_description=%3Cb%3EPay+here%3C%2Fb%3E")
    assert 'data-kind="failed"' in page and "Pay here" not in page and "server_error" in page
    assert "}}" not in page
    # the right mailbox: connected, the page says so, the account syncs
    status, _, where = await gw.page(link["url"])       # (that attempt ended: a new one)
    assert where is not None
    status, page, _ = await gw.page(ts.consent(where, email=rep))
    assert status == 200 and 'data-kind="connected"' in page and rep in page, page
    ident = account_id_for(rep)
    acct = await gw.account(ident)
    assert (acct["origin"], acct["status"], acct["auth_method"], acct["connected_email"]) == (
        "runtime", "active", "oauth2", rep)
    await wait_for(lambda: gw.messages(ident), 20, "the connected mailbox synced")
    assert await gw.messages(ident) == ["<cl@test>"]
    status, state = await gw.call("GET", f"/api/v1/connect-links/{link['id']}")
    assert status == 200 and state["state"] == "used" and state["result"] == "connected"

    # single use; a tampered link and a forged state change nothing
    status, page, _ = await gw.page(link["url"])
    assert status == 410 and 'data-kind="used"' in page
    status, page, _ = await gw.page(link["url"][:-2] + ("AA" if not link["url"].endswith("AA") else "BB"))
    assert status == 404 and 'data-kind="invalid"' in page
    status, page, _ = await gw.page(gw.public + "/connect/callback?state=forged&code=x")
    assert status == 400 and 'data-kind="state_invalid"' in page
    # bad requests for links name the parameter
    status, err = await gw.call("POST", "/api/v1/connect-links", {"provider": "nope", "email": rep})
    assert status == 400 and err["parameter"] == "provider"
    status, err = await gw.call("POST", "/api/v1/connect-links", {"provider": "testidp"})
    assert status == 400 and err["parameter"] == "email"
    status, err = await gw.call("POST", "/api/v1/connect-links",
                                {"provider": "testidp", "login": "bob"})       # open, yet sends as bob
    assert status == 400 and "email" in [p["parameter"] for p in err["problems"]], err
    status, err = await gw.call("POST", "/api/v1/connect-links",
                                {"provider": "testidp", "email": rep, "sync": {"folders": 5}})
    assert status == 400 and err["parameter"].startswith("sync.folders"), err
    status, err = await gw.call("POST", "/api/v1/connect-links",
                                {"provider": "testidp", "account_id": ident, "email": other})
    assert status == 400 and err["parameter"] == "email", err
    status, err = await gw.call("POST", "/api/v1/connect-links",
                                {"provider": "testidp", "account_id": "../../x"})
    assert status == 400 and err["parameter"] == "account_id", err

    # deleting the account revokes its refresh token at the provider
    assert gw.app.accounts is not None
    refresh = await gw.app.accounts.registry.refresh_token(ident)
    status, gone = await gw.call("DELETE", f"/api/v1/accounts/{ident}")
    assert status == 200 and gone["previous_status"] == "active"
    async with gw.session.post(ts.token_url, data={
            "grant_type": "refresh_token", "refresh_token": refresh, "client_id": ts.client_id,
            "client_secret": ts.client_secret}) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_grant"


def test_the_shell_adds_accounts_and_connects_one_with_the_device_flow(
        tmp_path: Path, dovecot: Dovecot, token_server: TokenServer) -> None:
    import subprocess
    import sys

    import yaml

    rep = new_user(dovecot)
    ts = token_server               # the one Dovecot checks tokens with
    ts.device_interval = 1          # poll every second (the RFC's default is 5)
    try:
        (tmp_path / "client-secret").write_text(ts.client_secret + "\n")
        cfg_path = tmp_path / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
            "users": [{"login": "rep@example.com", "password_hash": "$argon2id$x"}],
            "oauth": {"providers": {"testidp": {
                "issuer": ts.issuer, "token_endpoint": ts.token_url, "jwks_uri": ts.jwks_url,
                "device_authorization_endpoint": ts.device_authorization_url,
                "userinfo_endpoint": ts.userinfo_url, "client_id": ts.client_id,
                "client_secret_file": "client-secret", "scopes": ["mail", "openid", "email"],
                "mail_provider": "imap", "imap": imap(dovecot)}}}}))

        def mailgw(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            # in this process (tests/support/cli.py); `accounts connect` below is the real one
            return mailgw_in_process([*args, "-c", str(cfg_path)], stdin=stdin)

        added = mailgw("accounts", "add", "--id", "pw1", "--email", rep, "--imap-host", dovecot.host,
                       "--imap-port", str(dovecot.port), "--imap-tls", "none", "--secret-stdin",
                       "--folders", "INBOX", "--json", stdin=dovecot.users[rep] + "\n")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["origin"] == "runtime"
        tested = mailgw("accounts", "test", "pw1", "--json")
        assert tested.returncode == 0 and json.loads(tested.stdout)["ok"] is True, tested.stdout
        bad = mailgw("accounts", "add", "--id", "pw2", "--email", rep, "--provider", "imap")
        assert bad.returncode == 2 and "imap" in bad.stderr, bad.stderr

        proc = subprocess.Popen([sys.executable, "-m", "gateway", "accounts", "connect", "--provider",
                                 "testidp", "--email", rep, "--json", "-c", str(cfg_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            shown = json.loads(proc.stdout.readline())
            assert shown["verification_uri"].startswith(ts.base_url) and shown["user_code"]
            ts.approve_device(shown["user_code"], rep)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        result = json.loads(out)
        assert result["outcome"] == "connected" and result["email"] == rep, result
        listed = {a["id"]: a for a in json.loads(mailgw("accounts", "list", "--json").stdout)}
        assert listed[result["account"]]["auth_method"] == "oauth2"
        assert listed[result["account"]]["connected_email"] == rep
        assert listed["pw1"]["auth_method"] == "password"
        tested = mailgw("accounts", "test", result["account"], "--json")
        assert json.loads(tested.stdout)["ok"] is True, tested.stdout     # XOAUTH2 to Dovecot
    finally:
        ts.device_interval = 5


def _query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit
    return dict(parse_qsl(urlsplit(url).query))


async def _submit(gw: Gateway, sender: str, to: str, subject: str) -> None:
    import aiosmtplib

    assert gw.app.submission is not None
    raw = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n\r\nHello.\r\n")
    await aiosmtplib.send(raw, sender=sender, recipients=[to], hostname="127.0.0.1",
                          port=gw.app.submission.port, username=SELLER, password=PASSWORD,
                          start_tls=False, use_tls=False)


async def test_a_connected_account_sends_with_xoauth2_and_a_revoked_grant_defers_until_reconnected(
        gw: Gateway, dovecot: Dovecot, token_server: TokenServer) -> None:
    ts = token_server
    rep = new_user(dovecot)
    status, link = await gw.call("POST", "/api/v1/connect-links",
                                 {"provider": "testidp", "email": rep, "login": SELLER})
    assert status == 201, link
    _, _, where = await gw.page(link["url"])
    assert where is not None
    status, page, _ = await gw.page(ts.consent(where, email=rep))
    assert 'data-kind="connected"' in page
    ident = account_id_for(rep)
    assert (await gw.account(ident))["send_as"] == [SELLER]

    await _submit(gw, rep, LEAD, "first")
    [got] = await gw.upstream.wait_for(1, timeout=20)
    assert (got.mechanism, got.login, got.rcpt_tos) == ("XOAUTH2", rep, (LEAD,))
    assert gw.smarthost.messages == []

    # the rep revokes the gateway's access: the account needs reconnecting, mail waits
    ts.revoke(rep)
    ts.expire_access_tokens()
    gw.upstream.drop_connections()      # an authenticated session would go on: log in anew
    await gw.upstream.wait_until(lambda: gw.upstream.active == 0, 10, "sessions dropped")
    await _submit(gw, rep, LEAD, "second")
    await wait_for(lambda: _status(gw, ident, "needs_reconnect"), 20, "account marked needs_reconnect")
    dsns = await gw.smarthost.wait_for(1, timeout=20)     # one "delayed" DSN to the sender
    assert dsns[0].rcpt_tos == (rep,) and b"delayed" in dsns[0].data.lower()
    assert len(gw.upstream.messages) == 1                                # nothing more went out
    # a new link reconnects it; the waiting mail then leaves with the new grant
    status, again = await gw.call("POST", f"/api/v1/accounts/{ident}/reconnect")
    assert status == 201, again
    _, _, where = await gw.page(again["connect_link"]["url"])
    assert where is not None
    status, page, _ = await gw.page(ts.consent(where, email=rep))
    assert 'data-kind="reconnected"' in page, page
    assert (await gw.account(ident))["status"] == "active"
    assert gw.app.scheduler is not None
    gw.app.scheduler.retry_now()
    sent = await gw.upstream.wait_for(2, timeout=20)
    assert sent[1].mechanism == "XOAUTH2" and b"Subject: second" in sent[1].data


async def _status(gw: Gateway, ident: str, want: str) -> bool:
    return bool((await gw.account(ident))["status"] == want)


async def test_microsoft_app_only_access_sends_as_each_granted_mailbox(
        gw: Gateway, token_server: TokenServer) -> None:
    """One client-credentials token serves every mailbox the app was granted; the upstream
    (as Exchange Online does) accepts it only for those mailboxes."""
    ts = token_server
    granted, refused = "ann@example.test", "zed@example.test"
    ts.grant_mailboxes("m365-app", granted)
    for ident, mailbox in (("ann", granted), ("zed", refused)):
        status, created = await gw.call("POST", "/api/v1/accounts", {
            "id": ident, "email": mailbox, "provider": "microsoft365",
            "auth": {"method": "service", "service_account": "m365"},
            "sync": {"enabled": False}, "send_as": [SELLER] if ident == "ann" else []})
        assert status == 201, created
    await _submit(gw, granted, LEAD, "app only")
    [got] = await gw.upstream.wait_for(1, timeout=20)
    assert (got.mechanism, got.login) == ("XOAUTH2", granted)
    assert [g["grant_type"] for g in ts.grants][-1] == "client_credentials"
    # the mailbox the app has no permission on: the upstream refuses, the account needs attention
    status, _ = await gw.call("PATCH", "/api/v1/accounts/ann", {"send_as": []})
    assert status == 200
    status, _ = await gw.call("PATCH", "/api/v1/accounts/zed", {"send_as": [SELLER]})
    assert status == 200
    await _submit(gw, refused, LEAD, "not granted")
    await wait_for(lambda: _status(gw, "zed", "needs_reconnect"), 20, "zed marked needs_reconnect")
    assert len(gw.upstream.messages) == 1
