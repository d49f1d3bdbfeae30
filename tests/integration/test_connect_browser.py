"""A rep connects their mailbox with a connect link in a real browser, against the real daemon.

Everything is real and on loopback: `mailgw run` as a subprocess (admin API, public
tracking listener with the connect pages), headless Chromium (tests.support.browser)
clicking through the test OAuth server's consent page, Dovecot checking the gateway's
bearer tokens with its oauth2 passdb against that server's tokeninfo, and a webhook
receiver. The daemon's gateway.yaml declares no account: the mailbox is connected and
synced while it runs.

Covered: connect (the result page, the account in the API, `account.connected`, the
INBOX synced without a restart); the link used twice, refused consent, another mailbox
than the link's, an expired, a tampered and an unknown link, a forged `state`; a grant
revoked at the provider (the account needs reconnecting, `account.needs_reconnect`) and
reconnected through `POST /api/v1/accounts/{id}/reconnect` in the browser.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.accounts.connect import account_id_for
from gateway.accounts.registry import token_cipher
from gateway.config import load_config
from gateway.oauth.signed import SignedTokens
from tests.conftest import free_port, require_tool
from tests.integration.harness import Daemon, wait_port, write_config
from tests.integration.tailer_support import FAST_SYNC
from tests.support.browser import Browser, require_browser
from tests.support.dovecot import Dovecot, message
from tests.support.oauth_server import TokenServer
from tests.support.wait import wait_for_sync

pytestmark = pytest.mark.integration

LEAD = "lead@customer.test"
ADMIN_TOKEN = "admin-token-for-the-browser-test"
DEADLINE = 20.0
#: the fields of GET /api/v1/accounts that connecting or reconnecting a mailbox sets
_REGISTRATION = ("email", "origin", "provider", "auth_method", "oauth_provider", "status", "reason",
                 "status_at", "connected_email", "connected_at", "send_as", "folders")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def fetch(url: str, method: str = "GET", body: Any = None,
          token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request, redirects not followed: (status, body, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener.open(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@dataclass
class Hooks:
    """A webhook receiver on loopback (stdlib, its own thread): every event type and body."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> Hooks:
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hooks.events.append((self.headers.get("X-Mailgw-Event", ""), json.loads(raw)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="webhooks", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def of(self, kind: str, account: str) -> list[dict[str, Any]]:
        """The `data.account` of each `kind` event received for that account."""
        return [body["data"]["account"] for k, body in list(self.events)
                if k == kind and body["data"]["account"]["id"] == account]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Env:
    daemon: Daemon
    ts: TokenServer
    dc: Dovecot
    hooks: Hooks
    api: str
    public: str
    dir: Path

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, raw, _ = fetch(self.api + path, method, body, token=ADMIN_TOKEN)
        return status, json.loads(raw) if raw else None

    def accounts(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/api/v1/accounts")
        assert status == 200, body
        return {a["id"]: a for a in body["accounts"]}

    def registered(self) -> dict[str, dict[str, Any]]:
        """What a connect would change about each account (not its sync progress)."""
        return {i: {k: a[k] for k in _REGISTRATION} for i, a in self.accounts().items()}

    def account_status(self, ident: str) -> str | None:
        acct = self.accounts().get(ident)
        return None if acct is None else str(acct["status"])

    def messages(self, account: str) -> list[str]:
        status, body = self.call("GET", f"/api/v1/messages?account={account}")
        assert status == 200, body
        return [m["message_id"] for m in body["messages"]]

    def link(self, **body: Any) -> dict[str, Any]:
        status, link = self.call("POST", "/api/v1/connect-links", {"provider": "testidp", **body})
        assert status == 201, link
        assert str(link["url"]).startswith(self.public + "/connect/"), link
        return dict(link)

    def link_state(self, link_id: str) -> dict[str, Any]:
        status, state = self.call("GET", f"/api/v1/connect-links/{link_id}")
        assert status == 200, state
        return dict(state)

    def wait(self, predicate: Any, what: str, timeout: float = DEADLINE) -> None:
        try:
            wait_for_sync(predicate, timeout, what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log (tail) ---\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.daemon.log().splitlines()[-lines:])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_browser()
    require_tool("dovecot")
    root = tmp_path_factory.mktemp("connect-browser")
    tracking = free_port()
    with TokenServer() as ts, Dovecot(tokeninfo_url=ts.tokeninfo_url) as dc:
        ts.register_redirect_uri(f"http://127.0.0.1:{tracking}/connect/callback")
        hooks = Hooks().start()
        try:
            (root / "client-secret").write_text(ts.client_secret + "\n")
            (root / "admin-token").write_text(ADMIN_TOKEN + "\n")
            (root / "webhook-secret").write_text("webhook-secret\n")
            admin = free_port()
            path = write_config(
                root, upstream_port=free_port(),
                listeners={"tracking": {"host": "127.0.0.1", "port": tracking,
                                        "base_url": f"http://127.0.0.1:{tracking}"},
                           "admin": {"host": "127.0.0.1", "port": admin,
                                     "token_file": str(root / "admin-token")}},
                sync=dict(FAST_SYNC),
                webhooks=[{"url": hooks.url, "secret_file": str(root / "webhook-secret"),
                           "events": ["account.connected", "account.needs_reconnect"],
                           "retry_initial": "1s", "retry_max": "2s"}],
                oauth={"providers": {"testidp": {
                    "issuer": ts.issuer, "authorization_endpoint": ts.authorize_url,
                    "token_endpoint": ts.token_url, "jwks_uri": ts.jwks_url,
                    "userinfo_endpoint": ts.userinfo_url, "client_id": ts.client_id,
                    "client_secret_file": str(root / "client-secret"),
                    "scopes": ["mail", "openid", "email"], "mail_provider": "imap",
                    "imap": {"host": dc.host, "port": dc.port, "tls": "none"}}}})
            daemon = Daemon(path).start()
            try:
                wait_port(admin, proc=daemon.proc)
                wait_port(tracking, proc=daemon.proc)
                yield Env(daemon, ts, dc, hooks, f"http://127.0.0.1:{admin}",
                          f"http://127.0.0.1:{tracking}", root)
            finally:
                daemon.stop()
        finally:
            hooks.stop()


def approve(b: Browser, env: Env, url: str, *, sign_in_as: str, decision: str = "approve") -> str:
    """Open a connect link, sign in on the provider's consent page, decide; the outcome's kind."""
    b.open(url)
    assert b.wait_url(env.ts.authorize_url).startswith(env.ts.authorize_url)
    b.fill("#email", sign_in_as)
    b.click(f"#{decision}")
    b.wait_url(env.public + "/connect/callback")
    return str(b.wait("#outcome").get_attribute("data-kind"))


def test_a_rep_connects_their_mailbox_in_a_browser_and_bad_links_change_nothing(
        env: Env, tmp_path: Path) -> None:
    rep = "rep@example.test"
    env.dc.add_user(rep, "unused-password")        # the userdb entry; the gateway logs in with OAuth
    env.dc.append(rep, "INBOX", message("hello", sender=LEAD, to=rep, message_id="<browser1@test>"))
    status, body = env.call("POST", "/api/v1/contacts", {"contacts": [{"email": LEAD}]})
    assert status == 200, body
    ident = account_id_for(rep)
    assert ident not in env.accounts()

    with Browser(tmp_path) as b:
        # the link takes the rep to the provider, the provider back to the gateway's page
        link = env.link(email=rep)
        b.open(link["url"])
        b.wait_url(env.ts.authorize_url)
        assert b.wait("#email").get_attribute("value") == rep          # login_hint
        assert env.link_state(link["id"])["state"] == "opened"
        b.click("#approve")
        b.wait_attribute("#outcome", "data-kind", "connected")
        assert b.url.startswith(env.public + "/connect/callback?")
        assert b.text("#title") == "Mailbox connected"
        assert b.text("#email") == rep
        assert "INBOX" in b.text("#folders").split(", ")

        acct = env.accounts()[ident]
        assert (acct["origin"], acct["status"], acct["auth_method"], acct["connected_email"]) == (
            "runtime", "active", "oauth2", rep), acct
        state = env.link_state(link["id"])
        assert (state["state"], state["result"], state["result_account"]) == ("used", "connected", ident)
        env.wait(lambda: env.hooks.of("account.connected", ident), "the account.connected webhook")
        [hook] = env.hooks.of("account.connected", ident)
        assert (hook["email"], hook["connected_email"], hook["status"]) == (rep, rep, "active"), hook
        env.wait(lambda: env.messages(ident) == ["<browser1@test>"],
                 "the connected mailbox's INBOX message in GET /api/v1/messages (no restart)")

        # the same link again: used (410)
        b.open(link["url"])
        b.wait_attribute("#outcome", "data-kind", "used")
        assert b.text("#title") == "Link already used"
        assert fetch(link["url"])[0] == 410

        # refused consent: nothing is connected
        nobody = "nobody@example.test"
        refused = env.link(email=nobody)
        assert approve(b, env, refused["url"], sign_in_as=nobody, decision="deny") == "refused"
        assert b.text("#title") == "Access not granted"
        assert account_id_for(nobody) not in env.accounts()
        state = env.link_state(refused["id"])
        assert (state["state"], state["result"]) == ("opened", "refused")   # still usable

        # a link for another mailbox, approved as rep: mismatch, nothing changed
        before = env.registered()
        other = env.link(email="other@example.test")
        assert approve(b, env, other["url"], sign_in_as=rep) == "mismatch"
        assert b.text("#title") == "Wrong mailbox"
        assert "other@example.test" in b.text("#outcome") and rep in b.text("#outcome")
        assert env.registered() == before
        state = env.link_state(other["id"])
        assert (state["state"], state["result"]) == ("opened", "mismatch")  # still usable

        # a tampered link, an unknown one and an expired one
        token = link["url"].rsplit("/", 1)[1]
        tampered = link["url"][:-len(token)] + token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        b.open(tampered)
        b.wait_attribute("#outcome", "data-kind", "invalid")
        assert fetch(tampered)[0] == 404
        signer = SignedTokens(token_cipher(load_config(env.daemon.config_path)).derive("connect-links"))
        fresh = env.link(email="late@example.test")
        expired = env.public + "/connect/" + signer.sign("connect-link", {"l": fresh["id"]},
                                                         time.time() - 1)
        b.open(expired)
        b.wait_attribute("#outcome", "data-kind", "expired")
        assert fetch(expired)[0] == 410
        assert env.link_state(fresh["id"])["state"] == "new"        # the real link is untouched
        unknown = env.public + "/connect/" + signer.sign("connect-link", {"l": "0" * 32},
                                                         time.time() + 600)
        b.open(unknown)
        b.wait_attribute("#outcome", "data-kind", "invalid")

        # a callback whose state the gateway did not sign
        forged = env.public + "/connect/callback?state=forged&code=x"
        b.open(forged)
        b.wait_attribute("#outcome", "data-kind", "state_invalid")
        assert b.text("#title") == "Sign-in not recognised"
        assert fetch(forged)[0] == 400
        assert env.registered() == before


def test_a_revoked_grant_needs_reconnecting_and_the_rep_reconnects_in_a_browser(
        env: Env, tmp_path: Path) -> None:
    rep = "rep2@example.test"
    env.dc.add_user(rep, "unused-password")
    env.dc.append(rep, "INBOX", message("before", sender=LEAD, to=rep, message_id="<browser2@test>"))
    status, body = env.call("POST", "/api/v1/contacts", {"contacts": [{"email": LEAD}]})
    assert status == 200, body
    ident = account_id_for(rep)
    with Browser(tmp_path) as b:
        assert approve(b, env, env.link(email=rep)["url"], sign_in_as=rep) == "connected"
        env.wait(lambda: env.messages(ident) == ["<browser2@test>"], "the first sync")

        # the rep removes the gateway's access at the provider; the IMAP session drops
        env.ts.revoke(rep)
        env.ts.expire_access_tokens()
        env.dc.restart()
        env.wait(lambda: env.account_status(ident) == "needs_reconnect",
                 "the account marked needs_reconnect")
        env.wait(lambda: env.hooks.of("account.needs_reconnect", ident),
                 "the account.needs_reconnect webhook")

        status, body = env.call("POST", f"/api/v1/accounts/{ident}/reconnect")
        assert status == 201, body
        link = body["connect_link"]
        assert link["account_id"] == ident and link["email"] == rep, link
        assert approve(b, env, link["url"], sign_in_as=rep) == "reconnected"
        assert b.text("#title") == "Mailbox reconnected"
        assert b.text("#email") == rep
        env.wait(lambda: env.account_status(ident) == "active", "the account active again")
        env.wait(lambda: len(env.hooks.of("account.connected", ident)) == 2,
                 "account.connected for the reconnect")
        assert env.hooks.of("account.connected", ident)[1]["reconnected"] is True

        # and it syncs again: a new message arrives
        env.dc.append(rep, "INBOX", message("after", sender=LEAD, to=rep,
                                            message_id="<browser3@test>"))
        env.wait(lambda: "<browser3@test>" in env.messages(ident),
                 "a new message synced after reconnecting")
