"""Route `account` with an OAuth account, end to end on loopback: the scheduler, the real
SMTPTransport, an aiosmtpd upstream that offers AUTH XOAUTH2 / OAUTHBEARER and checks
each bearer token with the tests' OAuth server, and tokens from the gateway's own
TokenService (gateway.accounts.tokens) refreshing a refresh token that server issued.

    sender --spool--> Scheduler --AUTH XOAUTH2--> upstream (token_allows?) --> delivered
                          |  535: one refresh (rejected=) and AUTH again
                          |  refresh refused: needs_reconnect, 454 4.7.8, deferred
                          +--delayed DSN--> smarthost (never the account's upstream)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.accounts.grants import GrantClient
from gateway.accounts.tokens import ConfigAccounts, TokenService
from gateway.config import Config, load_config
from gateway.delivery.mx import MXResolver
from gateway.delivery.scheduler import Scheduler
from gateway.delivery.smtp import SMTPTransport
from gateway.keys.tokens import MemoryTokenStore, TokenCipher
from gateway.oauth.sasl import initial_response
from gateway.records import AcceptedMessage, EventRecord
from gateway.spool import Envelope, Recipient, Spool, new_queue_id
from tests.integration.harness import cli, password_hash, write_config
from tests.support.clock import FakeClock
from tests.support.oauth_server import TokenServer
from tests.support.upstream import Upstream, parse_oauthbearer, parse_xoauth2
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

REP = "alice@example.com"          # the submission user (and the message's sender)
MAILBOX = "alice@mail.example.test"  # the connected account's address and SMTP login
ACCOUNT = "alice-mailbox"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\n"
           b"Subject: oauth sending\r\nMessage-ID: <oauth-send@example.com>\r\n"
           b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nHello Bob.\r\n")


class Events:
    """The scheduler's EventSink, recording."""

    def __init__(self) -> None:
        self.events: list[EventRecord] = []

    def add_accepted(self, a: AcceptedMessage) -> None:
        pass

    def add_event(self, e: EventRecord) -> None:
        self.events.append(e)

    def types(self) -> list[str]:
        return [e.type for e in self.events]


class RecordedTokens:
    """The daemon's TokenSource (a TokenService over the configured accounts), each call
    recorded."""

    def __init__(self, service: TokenService) -> None:
        self.service = service
        self.calls: list[tuple[str, str | None]] = []

    async def access_token(self, account_id: str, *, rejected: str | None = None) -> str:
        self.calls.append((account_id, rejected))
        return await self.service.access_token(account_id, rejected=rejected)


class Status:
    """An AccountStatusSink, recording."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    async def needs_reconnect(self, account_id: str, reason: str) -> None:
        self.reports.append((account_id, reason))


@dataclass
class Rig:
    ts: TokenServer
    up: Upstream             # the account's own SMTP server (AUTH XOAUTH2/OAUTHBEARER)
    smarthost: Upstream      # where DSNs go (no AUTH)
    config_path: Path
    cfg: Config
    spool: Spool
    clock: FakeClock
    events: Events
    tokens: RecordedTokens
    status: Status
    scheduler: Scheduler

    async def send(self, *rcpts: str, route: str | None = None) -> str:
        """Spool MESSAGE from REP to `rcpts` (by `route` when a policy chose one) and hand
        it to the scheduler; its queue id."""
        env = Envelope(id=new_queue_id(self.clock()), mail_from=REP,
                       recipients=[Recipient(r) for r in rcpts], received_at=self.clock(),
                       user=REP, route=route)
        await self.spool.put(env, MESSAGE)
        self.scheduler.notify(env.id)
        return env.id

    def state(self, qid: str) -> str | None:
        for state in ("incoming", "deferred", "hold", "corrupt"):
            if (self.spool.dir(state) / qid).exists():
                return state
        return None

    async def settled(self, qid: str, state: str | None) -> None:
        await wait_for(lambda: self.state(qid) == state and self.scheduler.busy == 0,
                       timeout=20, what=f"{qid} to be {state or 'gone'}")


@pytest.fixture
def ts() -> Iterator[TokenServer]:
    with TokenServer(access_lifetime=3600) as server:
        yield server


@contextlib.asynccontextmanager
async def make_rig(tmp_path: Path, ts: TokenServer, *, auth: dict[str, Any] | None = None,
                   mechanism: str = "xoauth2",
                   mechanisms: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER"),
                   error_challenge: bool = True, route: str = "account") -> AsyncIterator[Rig]:
    """Both upstreams, the configuration (REP sends as ACCOUNT, an OAuth account logging
    in with `mechanism` unless `auth` says otherwise; `delivery.route`) and the running
    scheduler."""
    refresh = tmp_path / "alice.refresh"
    refresh.write_text(ts.issue_refresh_token(MAILBOX) + "\n")
    secret = tmp_path / "client.secret"
    secret.write_text(ts.client_secret + "\n")
    oauth = {"method": "oauth2", "token_endpoint": ts.token_url, "client_id": ts.client_id,
             "client_secret_file": str(secret), "refresh_token_file": str(refresh),
             "mechanism": mechanism}
    async with Upstream(oauth=ts.token_allows, oauth_mechanisms=mechanisms,
                        oauth_error_challenge=error_challenge) as up, Upstream() as smarthost:
        config_path = write_config(
            tmp_path, upstream_port=smarthost.port,
            users=[{"login": REP, "password_hash": password_hash(), "account": ACCOUNT}],
            accounts=[{"id": ACCOUNT, "email": MAILBOX, "provider": "imap",
                       "imap": {"host": "127.0.0.1", "port": 993},
                       "auth": auth or oauth,
                       "smtp": {"host": "127.0.0.1", "port": up.port, "tls": "none"},
                       "sync": {"enabled": False}}],
            delivery={"route": route, "retry": {"schedule": ["10m"],
                                                     "give_up_after": "1d"}})
        cfg = load_config(config_path)
        spool = Spool(cfg.spool_path)
        spool.setup()
        clock = FakeClock()
        events = Events()
        service = TokenService(lambda: cfg, ConfigAccounts(lambda: cfg), MemoryTokenStore(),
                               TokenCipher(TokenCipher.generate_key()), GrantClient())
        tokens = RecordedTokens(service)
        status = Status()
        # idle_timeout=0: no pooled connection, so every message logs in afresh
        transport = SMTPTransport("gw.example.test", connect_timeout=5, command_timeout=5,
                                  idle_timeout=0)
        scheduler = Scheduler(lambda: cfg, spool, transport, MXResolver(), events,
                              clock=clock, scan_interval=0.05, tokens=tokens, status=status)
        await scheduler.start()
        try:
            yield Rig(ts, up, smarthost, config_path, cfg, spool, clock, events, tokens,
                      status, scheduler)
        finally:
            await scheduler.stop(timeout=5)
            await service.close()
            spool.close()


@pytest.fixture
async def rig(tmp_path: Path, ts: TokenServer) -> AsyncIterator[Rig]:
    async with make_rig(tmp_path, ts) as r:
        yield r


# -- the cases ---------------------------------------------------------------------------------


async def test_a_message_arrives_upstream_after_auth_xoauth2(rig: Rig) -> None:
    qid = await rig.send("bob@example.net")
    [got] = await rig.up.wait_for(1, timeout=20)
    await rig.settled(qid, None)
    assert (got.mechanism, got.login) == ("XOAUTH2", MAILBOX)
    assert got.mail_from == REP and got.rcpt_tos == ("bob@example.net",)
    assert got.data.endswith(b"Hello Bob.\r\n")
    [attempt] = rig.up.auth_attempts
    assert (attempt.mechanism, attempt.login, attempt.accepted) == ("XOAUTH2", MAILBOX, True)
    assert [g["grant_type"] for g in rig.ts.grants] == ["refresh_token"]
    assert rig.tokens.calls == [(ACCOUNT, None)]
    assert rig.events.types() == ["sent"] and rig.status.reports == []
    assert rig.smarthost.messages == []


async def test_oauthbearer(tmp_path: Path, ts: TokenServer) -> None:
    async with make_rig(tmp_path, ts, mechanism="oauthbearer",
                        mechanisms=("OAUTHBEARER",)) as rig:
        qid = await rig.send("bob@example.net")
        [got] = await rig.up.wait_for(1, timeout=20)
        await rig.settled(qid, None)
        assert (got.mechanism, got.login) == ("OAUTHBEARER", MAILBOX)
        assert [(a.mechanism, a.accepted) for a in rig.up.auth_attempts] == [
            ("OAUTHBEARER", True)]


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
@pytest.mark.parametrize("error_challenge", [True, False], ids=["challenge", "plain-535"])
async def test_an_expired_token_is_refreshed_once_and_the_message_delivered(
        tmp_path: Path, ts: TokenServer, mechanism: str, error_challenge: bool) -> None:
    async with make_rig(tmp_path, ts, mechanism=mechanism,
                        error_challenge=error_challenge) as rig:
        first = await rig.send("bob@example.net")
        await rig.settled(first, None)
        ts.expire_access_tokens()  # the TokenService still holds the token as valid
        second = await rig.send("carol@example.org")
        await rig.up.wait_for(2, timeout=20)
        await rig.settled(second, None)
        mech = mechanism.upper()
        stale = rig.up.auth_attempts[0].token
        assert [(a.mechanism, a.accepted) for a in rig.up.auth_attempts] == [
            (mech, True), (mech, False), (mech, True)]
        assert rig.up.auth_attempts[1].token == stale != rig.up.auth_attempts[2].token
        assert rig.tokens.calls == [(ACCOUNT, None), (ACCOUNT, None), (ACCOUNT, stale)]
        assert len(ts.grants) == 2
        assert [m.rcpt_tos for m in rig.up.messages] == [("bob@example.net",),
                                                         ("carol@example.org",)]
        assert rig.events.types() == ["sent", "sent"] and rig.status.reports == []
        assert rig.smarthost.messages == []


async def test_a_revoked_grant_defers_needs_reconnect_and_warns_the_sender(rig: Rig) -> None:
    first = await rig.send("bob@example.net")
    await rig.settled(first, None)
    assert rig.ts.revoke(MAILBOX) >= 2   # the refresh token and the access token

    qid = await rig.send("carol@example.org")
    await rig.settled(qid, "deferred")
    [rcpt] = rig.spool.read_envelope("deferred", qid).recipients
    reply = rcpt.last_reply or ""
    assert rcpt.status == "pending"
    assert reply.startswith("454 4.7.8 account alice-mailbox needs reconnecting")
    assert "invalid_grant" in reply
    assert rig.status.reports == [(ACCOUNT, reply)]
    assert rig.tokens.calls[-1] == (ACCOUNT, rig.up.auth_attempts[0].token)
    assert [a.accepted for a in rig.up.auth_attempts] == [True, False]
    assert len(rig.up.messages) == 1  # only the first message

    # the sender hears of it, once, through the smarthost
    [dsn] = await rig.smarthost.wait_for(1, timeout=20)
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == (REP,)  # the null sender
    assert b"Action: delayed" in dsn.data and b"Status: 4.7.8" in dsn.data
    assert b"needs reconnecting" in dsn.data
    assert re.findall(rb"Final-Recipient: rfc822; *(\S+)", dsn.data) == [b"carol@example.org"]
    assert rig.spool.read_envelope("deferred", qid).delay_notified
    assert rig.events.types() == ["sent", "deferred"]
    assert rig.scheduler.stats.bounced == 0 and rig.scheduler.stats.dsns == 0

    # the next attempt is refused as well: reported again, no second DSN, nothing bounced
    rig.clock.advance(600)
    await wait_for(lambda: len(rig.status.reports) == 2, timeout=20, what="the retry")
    await rig.settled(qid, "deferred")
    assert len(rig.smarthost.messages) == 1 and rig.scheduler.stats.delayed_dsns == 1

    # and `mailgw queue list` says why the message waits
    out = await asyncio.to_thread(cli, rig.config_path, "queue", "list")
    assert out.returncode == 0, out.stderr
    assert "carol@example.org" in out.stdout and "needs reconnecting" in out.stdout


async def test_530_from_an_account_without_credentials_is_deferred(
        tmp_path: Path, ts: TokenServer) -> None:
    # a password account with no password: the gateway never logs in, the upstream says 530.
    # `mailgw check` refuses that with delivery.route account; a policy can still pick the
    # route for one message (and a stored account can lose its credentials at run time)
    async with make_rig(tmp_path, ts, auth={"method": "password"}, route="smarthost") as rig:
        qid = await rig.send("bob@example.net", route="account")
        await rig.settled(qid, "deferred")
        [rcpt] = rig.spool.read_envelope("deferred", qid).recipients
        reply = rcpt.last_reply or ""
        assert re.match(r"454 4\.7\.0 host 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ demands "
                        r"authentication \(530 5\.7\.0 Authentication required\)", reply), reply
        assert reply.endswith("account alice-mailbox has no SMTP credentials configured")
        [dsn] = await rig.smarthost.wait_for(1, timeout=20)
        assert b"Action: delayed" in dsn.data and b"no working credentials" in dsn.data
        assert rig.status.reports == [] and rig.up.messages == []
        assert rig.events.types() == ["deferred"]


# -- the upstream's parsers of what the client sends ---------------------------------------

_login = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
_token = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                 max_size=200)


@given(user=_login, token=_token)
def test_xoauth2_responses_parse_back(user: str, token: str) -> None:
    assert parse_xoauth2(initial_response("xoauth2", user, token, "h", 1)) == (user, token)


@given(user=_login, token=_token, port=st.integers(1, 65535))
def test_oauthbearer_responses_parse_back(user: str, token: str, port: int) -> None:
    raw = initial_response("oauthbearer", user, token, "smtp.example.test", port)
    assert parse_oauthbearer(raw) == (user, token)


@given(raw=st.binary(max_size=80))
def test_anything_else_is_a_value_error(raw: bytes) -> None:
    """The upstream answers 501 to what it cannot parse: no other exception escapes."""
    for parse in (parse_xoauth2, parse_oauthbearer):
        try:
            _user, token = parse(raw)
        except ValueError:  # UnicodeDecodeError included
            continue
        assert raw.endswith(b"\x01\x01") and token.encode() in raw
