"""The delivery scheduler on its own: an in-memory transport, a fake clock, a real spool.

Each test drives the running scheduler (its workers and timer) and asserts on what a
reader of the spool and of the recorded events would see, waiting on conditions with
deadlines. Time moves only when a test advances the clock; the scheduler's timer looks
at the clock every `SCAN` seconds of real time.

Route `account` for connected accounts: an OAuth account's token comes from the
TokenSource (`Tokens`), credentials that stop working defer (never bounce), tell the
AccountStatusSink (`Status`) and warn the sender once with a delayed DSN, and DSNs
never go by route `account`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.aio import wait_event
from gateway.config import Account, Config
from gateway.crm.writer import StoreWriter
from gateway.delivery.mx import MXResolver
from gateway.delivery.scheduler import LocalMessage, Scheduler
from gateway.delivery.transport import Destination, RcptResult
from gateway.directory import AccountDirectory
from gateway.errors import AccountAuthError, AccountUnavailable, MailError, PermanentFailure
from gateway.records import AcceptedMessage, Copy, EventRecord
from gateway.relay import Relay, Submission
from gateway.spool import (
    QUEUED_STATES,
    Envelope,
    Recipient,
    Spool,
    new_queue_id,
    outcome_event,
    outcome_events,
)
from tests.support.clock import FakeClock
from tests.support.transport import MemoryTransport, Sent
from tests.support.wait import wait_for

SCAN = 0.01
SENDER = "sender@gw.test"
DATA = (b"From: Sender <sender@gw.test>\r\nTo: a@example.test\r\nSubject: hello\r\n"
        b"Message-ID: <m1@gw.test>\r\n\r\nbody\r\n")


class Events:
    """The scheduler's EventSink, recording."""

    def __init__(self) -> None:
        self.accepted: list[AcceptedMessage] = []
        self.events: list[EventRecord] = []

    def add_accepted(self, a: AcceptedMessage) -> None:
        self.accepted.append(a)

    def add_event(self, e: EventRecord) -> None:
        self.events.append(e)

    def of(self, rcpt: str) -> list[str]:
        """The event types recorded for `rcpt`, in order."""
        return [e.type for e in self.events if e.recipient == rcpt]


class Local:
    """A LocalDelivery that keeps what it is given, or refuses with `refuse`."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.got: list[LocalMessage] = []
        self.refuse = refuse

    async def accept(self, msg: LocalMessage) -> str:
        if self.refuse is not None:
            raise self.refuse
        self.got.append(msg)
        return f"ing-{len(self.got)}"


def make_config(schedule: list[float], give_up_after: float, **delivery: Any) -> Config:
    return Config.model_validate({
        "hostname": "gw.test",
        "delivery": {"route": "smarthost",
                     "smarthost": {"host": "relay.test", "port": 2525, "tls": "none"},
                     "retry": {"schedule": schedule, "give_up_after": give_up_after},
                     "concurrency": 2, **delivery},
    })


class Tokens:
    """A TokenSource handing out `tok-1`, `tok-2`, ...; or raising `fail` when set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.fail: Exception | None = None
        self.issued = 0

    async def access_token(self, account_id: str, *, rejected: str | None = None) -> str:
        self.calls.append((account_id, rejected))
        if self.fail is not None:
            raise self.fail
        self.issued += 1
        return f"tok-{self.issued}"


class Status:
    """An AccountStatusSink, recording."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    async def needs_reconnect(self, account_id: str, reason: str) -> None:
        self.reports.append((account_id, reason))


class Harness:
    """A spool, a clock, a transport, events, and the scheduler over them."""

    def __init__(self, root: Path, cfg: Config,
                 directory: AccountDirectory | None = None) -> None:
        self.cfg = cfg
        self.clock = FakeClock()
        self.t0 = self.clock()
        self.spool = Spool(root)
        self.spool.setup()
        self.transport = MemoryTransport(clock=self.clock)
        self.events = Events()
        self.local = Local()
        self.tokens = Tokens()
        self.status = Status()
        self.directory = directory
        self.scheduler = self.new_scheduler()

    def new_scheduler(self) -> Scheduler:
        return Scheduler(lambda: self.cfg, self.spool, self.transport, MXResolver(),
                         self.events, clock=self.clock, scan_interval=SCAN, local=self.local,
                         directory=self.directory, tokens=self.tokens, status=self.status)

    async def queue(self, *rcpts: str, notify: bool = True, **fields: Any) -> str:
        """Spool a message from SENDER to `rcpts`, received now; its queue id."""
        env = Envelope(id=new_queue_id(self.clock()), mail_from=fields.pop("mail_from", SENDER),
                       recipients=[Recipient(r) for r in rcpts], received_at=self.clock(),
                       **fields)
        await self.spool.put(env, DATA)
        if notify:
            self.scheduler.notify(env.id)
        return env.id

    def state(self, qid: str) -> str | None:
        """The spool directory `qid` is in; None once it is gone."""
        for state in ("incoming", "deferred", "hold", "done", "corrupt"):
            if (self.spool.dir(state) / qid).exists():
                return state
        return None

    def deferred(self, qid: str) -> Envelope:
        return self.spool.read_envelope("deferred", qid)

    def dsns(self) -> list[bytes]:
        """The DSNs the transport carried (null sender)."""
        return [s.data for s in self.transport.sends if s.mail_from == ""]

    async def wait_sends(self, rcpt: str, n: int) -> None:
        await wait_for(lambda: len(self.transport.sent_to(rcpt)) >= n,
                       what=f"attempt {n} for {rcpt}")

    async def wait_settled(self, qid: str, state: str | None) -> None:
        """Until `qid` is in `state` (None: gone) and no attempt is in flight."""
        await wait_for(lambda: self.state(qid) == state and self.scheduler.busy == 0,
                       what=f"{qid} to be {'gone' if state is None else 'in ' + state}")

    async def timer_tick(self) -> None:
        """Wait until the timer has looked at the clock since now: it finds a message
        that was put into incoming/ without notify() only by its scan, which comes after
        it took the entries due by the clock's present value."""
        # kept out of the store: nothing owed to a writer, so it leaves the spool at once
        probe = await self.queue("probe@example.test", notify=False, crm_store=False)
        await self.wait_settled(probe, None)


@pytest.fixture
def cfg() -> Config:
    return make_config([60.0, 300.0], give_up_after=86400.0)


@pytest.fixture
async def h(tmp_path: Path, cfg: Config) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "spool", cfg)
    await harness.scheduler.start()
    try:
        yield harness
    finally:
        await harness.scheduler.stop(timeout=5)
        harness.spool.close()


async def test_a_delivered_message_leaves_the_spool_with_a_sent_event(h: Harness) -> None:
    qid = await h.queue("a@example.test", "b@example.test")
    await h.wait_settled(qid, None)
    [sent] = h.transport.sends
    assert sent.rcpts == ("a@example.test", "b@example.test") and sent.mail_from == SENDER
    assert sent.dest is not None and sent.dest.where == "relay.test:2525"
    assert sent.data == DATA
    assert h.events.of("a@example.test") == h.events.of("b@example.test") == ["sent"]
    assert all(e.queue_id == qid and e.details["reply"] == "250 2.0.0 ok"
               for e in h.events.events)
    assert h.dsns() == []


async def test_the_delivery_line_names_the_group_and_message_id(h: Harness) -> None:
    """A per-recipient copy's delivery is found from the id the client saw (its group)."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        qid = await h.queue("a@example.test", group="GROUP-1", message_id="<m1@example.com>")
        await h.wait_settled(qid, None)
    [line] = [x for x in logs if x["event"] == "delivery"]
    assert (line["queue_id"], line["group"], line["message_id"], line["rcpt"], line["status"]) \
        == (qid, "GROUP-1", "<m1@example.com>", "a@example.test", "sent")


async def test_retries_follow_the_schedule_and_repeat_its_last_interval(h: Harness) -> None:
    rcpt = "a@example.test"
    h.transport.script(rcpt, "451 4.2.0 busy", "451 4.2.0 busy", "451 4.2.0 busy", "250 ok")
    qid = await h.queue(rcpt)
    await h.wait_settled(qid, "deferred")
    env = h.deferred(qid)
    assert env.attempts == 1 and env.recipients[0].last_reply == "451 4.2.0 busy"
    assert env.next_attempt == h.t0 + 60

    # retried when due (schedule[0]), never before
    h.clock.advance(59)
    await h.timer_tick()
    assert len(h.transport.sent_to(rcpt)) == 1
    h.clock.advance(1)
    await h.wait_sends(rcpt, 2)
    await h.wait_settled(qid, "deferred")
    assert h.deferred(qid).next_attempt == h.t0 + 60 + 300  # schedule[1]

    h.clock.advance(299)
    await h.timer_tick()
    assert len(h.transport.sent_to(rcpt)) == 2
    h.clock.advance(1)
    await h.wait_sends(rcpt, 3)
    await h.wait_settled(qid, "deferred")
    assert h.deferred(qid).next_attempt == h.t0 + 60 + 300 + 300  # the last one, again

    h.clock.advance(300)
    await h.wait_settled(qid, None)
    assert [s.at - h.t0 for s in h.transport.sent_to(rcpt)] == [0, 60, 360, 660]
    assert h.events.of(rcpt) == ["deferred", "deferred", "deferred", "sent"]
    assert [e.details["attempt"] for e in h.events.events if e.recipient == rcpt] == [1, 2, 3, 4]
    assert h.dsns() == []


async def test_a_deferred_entry_survives_a_restart(h: Harness) -> None:
    rcpt = "a@example.test"
    h.transport.script(rcpt, "421 4.4.2 closing", "250 ok")
    qid = await h.queue(rcpt)
    await h.wait_settled(qid, "deferred")
    await h.scheduler.stop(timeout=5)
    assert h.transport.closed

    h.scheduler = h.new_scheduler()  # the fixture stops this one
    await h.scheduler.start()
    await h.timer_tick()
    assert len(h.transport.sent_to(rcpt)) == 1  # not due yet after the restart either
    h.clock.advance(60)
    await h.wait_settled(qid, None)
    assert h.events.of(rcpt) == ["deferred", "sent"]


async def test_permanent_failure_bounces_only_the_refused_recipients(h: Harness) -> None:
    ok, refused, later = "a@example.test", "b@example.test", "c@example.test"
    h.transport.script(refused, "550 5.1.1 no such user")
    h.transport.script(later, "452 4.2.2 mailbox full", "250 ok")
    qid = await h.queue(ok, refused, later)
    await wait_for(lambda: len(h.dsns()) == 1, what="the DSN")
    await h.wait_settled(qid, "deferred")

    env = h.deferred(qid)
    assert {r.addr: r.status for r in env.recipients} == {
        ok: "sent", refused: "bounced", later: "pending"}
    [dsn_send] = [s for s in h.transport.sends if s.mail_from == ""]
    assert dsn_send.rcpts == (SENDER,)
    dsn = dsn_send.data
    assert re.findall(rb"Final-Recipient: rfc822; *(\S+)", dsn) == [refused.encode()]
    assert b"Status: 5.1.1" in dsn and b"550 5.1.1 no such user" in dsn

    # the next attempt carries only the recipient still pending; no second DSN
    h.clock.advance(60)
    await h.wait_settled(qid, None)
    assert [s.rcpts for s in h.transport.sends if s.mail_from == SENDER] == [
        (ok, refused, later), (later,)]
    assert h.events.of(ok) == ["sent"]
    assert h.events.of(refused) == ["bounced"]
    assert h.events.of(later) == ["deferred", "sent"]
    assert len(h.dsns()) == 1 and h.scheduler.stats.dsns == 1


async def test_expiry_sends_exactly_one_447_dsn(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", make_config([600.0], give_up_after=3600.0))
    await h.scheduler.start()
    try:
        a, b = "a@example.test", "b@example.test"
        h.transport.script(a, "451 4.2.0 busy")
        h.transport.script(b, "451 4.3.2 try later")
        qid = await h.queue(a, b)
        await h.wait_settled(qid, "deferred")
        h.clock.advance(1800)  # due, not expired: deferred again
        await h.wait_sends(a, 2)
        await h.wait_settled(qid, "deferred")
        assert h.dsns() == []
        h.clock.advance(1800)  # now - received_at == give_up_after
        await h.wait_settled(qid, None)
        await wait_for(lambda: h.scheduler.busy == 0 and len(h.dsns()) == 1, what="the DSN")
        [dsn] = h.dsns()
        assert re.findall(rb"Final-Recipient: rfc822; *(\S+)", dsn) == [a.encode(), b.encode()]
        assert dsn.count(b"Status: 4.4.7") == 2 and dsn.count(b"Action: failed") == 2
        assert b"451 4.2.0 busy" in dsn and b"451 4.3.2 try later" in dsn
        assert h.events.of(a) == h.events.of(b) == ["deferred", "deferred", "bounced"]
        bounced = [e for e in h.events.events if e.type == "bounced"]
        assert all(e.details.get("expired") is True for e in bounced)
        assert h.scheduler.stats.dsns == 1
        assert h.spool.list_ids("incoming") == h.spool.list_ids("deferred") == []
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_no_dsn_about_a_dsn(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", make_config([600.0], give_up_after=3600.0))
    await h.scheduler.start()
    try:
        # the sender's server keeps deferring the DSN until it expires
        h.transport.script(SENDER, "452 4.2.2 full")
        h.transport.script("a@example.test", "550 5.1.1 no such user")
        qid = await h.queue("a@example.test")
        await h.wait_settled(qid, None)
        await wait_for(lambda: len(h.dsns()) == 1, what="the DSN's first attempt")
        [dsn_id] = h.spool.list_ids("deferred")
        h.clock.advance(3600)
        await h.wait_settled(dsn_id, None)
        assert len(h.dsns()) == 2  # the DSN's own two attempts; nothing about it
        assert h.scheduler.stats.dsns == 1
        assert all(e.queue_id == qid for e in h.events.events)  # a DSN records no events
        assert h.spool.list_ids("incoming") == h.spool.list_ids("deferred") == []

        # a bounce that comes in as mail (null sender) is never answered with a DSN either
        bounce = await h.queue("x@example.test", mail_from="")
        h.transport.script("x@example.test", "550 5.1.1 gone")
        await h.wait_settled(bounce, None)
        assert h.scheduler.stats.dsns == 1
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_a_corrupt_queue_file_goes_to_corrupt_and_is_not_retried(h: Harness) -> None:
    qid = new_queue_id(h.clock())
    garbage = b"MAILGW-SPOOL 1\n{not json\nbody\r\n"
    (h.spool.dir("incoming") / qid).write_bytes(garbage)
    h.scheduler.notify(qid)
    await h.wait_settled(qid, "corrupt")
    assert (h.spool.dir("corrupt") / qid).read_bytes() == garbage  # kept, never deleted
    h.clock.advance(86400)
    await h.timer_tick()
    assert h.state(qid) == "corrupt"
    assert [s for s in h.transport.sends if "probe@example.test" not in s.rcpts] == []
    assert {e.recipient for e in h.events.events} <= {"probe@example.test"}


async def test_a_corrupt_deferred_file_is_set_aside_at_start(tmp_path: Path, cfg: Config) -> None:
    h = Harness(tmp_path / "spool", cfg)
    qid = new_queue_id(h.clock())
    (h.spool.dir("deferred") / qid).write_bytes(b"not a queue file at all")
    await h.scheduler.start()
    try:
        assert h.state(qid) == "corrupt"
        h.clock.advance(86400)
        await h.timer_tick()
        assert h.state(qid) == "corrupt"
        assert all(s.rcpts == ("probe@example.test",) for s in h.transport.sends)
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_ingest_route_hands_the_message_to_local_delivery(h: Harness) -> None:
    qid = await h.queue("crm@gw.test", route="ingest", user="rep@gw.test",
                        client_ip="192.0.2.7", client_helo="laptop")
    await h.wait_settled(qid, None)
    assert h.transport.sends == []
    assert h.local.got == [LocalMessage(mail_from=SENDER, data=DATA, client_ip="192.0.2.7",
                                        client_helo="laptop", user="rep@gw.test")]
    [event] = h.events.events
    assert (event.type, event.details["reply"], event.details["remote"]) == (
        "sent", "250 2.0.0 Ok: logged as ing-1", "local")


async def test_ingest_route_refusals_are_the_replies(h: Harness) -> None:
    h.local.refuse = PermanentFailure("not from a known sender", code=550, status="5.7.1")
    qid = await h.queue("crm@gw.test", route="ingest")
    await h.wait_settled(qid, None)
    assert h.events.of("crm@gw.test") == ["bounced"]
    assert h.events.events[0].details["reply"] == "550 5.7.1 not from a known sender"
    await wait_for(lambda: len(h.dsns()) == 1, what="the DSN")

    h.scheduler.local = None  # a node without the ingest service: retried later
    qid = await h.queue("crm@gw.test", route="ingest")
    await h.wait_settled(qid, "deferred")
    assert h.deferred(qid).recipients[0].last_reply == (
        "451 4.3.0 the ingest address is not configured here")


# -- route account: connected accounts ----------------------------------------------------

REP = "rep@gw.test"               # the submission user, who sends as the account below
MAILBOX = "rep@example.com"       # the account's address and default SMTP login
ACCOUNT = "rep-mailbox"
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
OAUTH = {"method": "oauth2", "token_endpoint": "https://idp.test/token", "client_id": "gw",
         "refresh_token_file": "env:MAILGW_TEST_UNUSED_REFRESH_TOKEN"}


def account_config(auth: dict[str, Any] | None = None, *, smarthost: bool = True,
                   smtp: dict[str, Any] | None = None, give_up_after: float = 86400.0) -> Config:
    """Route `account`; REP sends as ACCOUNT (an OAuth account unless `auth` says
    otherwise) at smtp.example.com; the smarthost relay.test unless `smarthost=False`."""
    delivery: dict[str, Any] = {"route": "account", "concurrency": 2,
                                "retry": {"schedule": [60.0], "give_up_after": give_up_after}}
    if smarthost:
        delivery["smarthost"] = {"host": "relay.test", "port": 2525, "tls": "none"}
    return Config.model_validate({
        "hostname": "gw.test",
        "users": [{"login": REP, "password_hash": HASH, "account": ACCOUNT}],
        "accounts": [{"id": ACCOUNT, "email": MAILBOX, "auth": auth or OAUTH,
                      "smtp": {"host": "smtp.example.com", "port": 587, "tls": "starttls",
                               **(smtp or {})},
                      "sync": {"enabled": False}}],
        "delivery": delivery,
    })


@pytest.fixture
async def acct(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "spool", account_config())
    await harness.scheduler.start()
    try:
        yield harness
    finally:
        await harness.scheduler.stop(timeout=5)
        harness.spool.close()


def account_sends(h: Harness) -> list[Destination]:
    """The destinations of every send to the account's upstream."""
    return [s.dest for s in h.transport.sends
            if s.dest is not None and s.dest.host == "smtp.example.com"]


def delayed_dsns(h: Harness) -> list[bytes]:
    return [d for d in h.dsns() if b"Action: delayed" in d]


async def test_an_oauth_account_logs_in_with_a_token_from_the_token_source(
        acct: Harness) -> None:
    qid = await acct.queue("bob@example.net", user=REP)
    await acct.wait_settled(qid, None)
    [sent] = acct.transport.sends
    assert sent.dest is not None
    assert (sent.dest.host, sent.dest.port, sent.dest.tls) == ("smtp.example.com", 587,
                                                                "starttls")
    assert (sent.dest.mechanism, sent.dest.username, sent.dest.account) == (
        "xoauth2", MAILBOX, ACCOUNT)
    assert sent.dest.password is None
    assert sent.tokens == ("tok-1",) and acct.tokens.calls == [(ACCOUNT, None)]
    # the token is no part of the destination, which keys the connection pool
    async def another_getter(*, rejected: str | None = None) -> str:
        return "other"
    assert "tok-1" not in repr(sent.dest)
    assert sent.dest == Destination(host="smtp.example.com", port=587, tls="starttls",
                                    tls_required=True, username=MAILBOX,
                                    mechanism="xoauth2", account=ACCOUNT,
                                    token=another_getter)
    assert acct.events.of("bob@example.net") == ["sent"] and acct.dsns() == []


async def test_oauthbearer_and_an_explicit_smtp_login(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", account_config({**OAUTH, "mechanism": "oauthbearer"},
                                                   smtp={"username": "rep.login"}))
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, None)
        [dest] = account_sends(h)
        assert (dest.mechanism, dest.username) == ("oauthbearer", "rep.login")
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_a_service_account_mailbox_logs_in_with_tokens_too(tmp_path: Path) -> None:
    cfg = account_config({"method": "service", "service_account": "workspace"})
    cfg = Config.model_validate({**cfg.model_dump(exclude_unset=True),
                                 "service_accounts": [{"id": "workspace", "kind": "google",
                                                       "key_file": "env:MAILGW_TEST_UNUSED"}]})
    h = Harness(tmp_path / "spool", cfg)
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, None)
        [dest] = account_sends(h)
        assert (dest.mechanism, dest.username, dest.account) == ("xoauth2", MAILBOX, ACCOUNT)
        assert h.tokens.calls == [(ACCOUNT, None)]
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_a_refused_token_is_refreshed_once(acct: Harness) -> None:
    acct.transport.refuse_tokens = {"tok-1"}
    qid = await acct.queue("bob@example.net", user=REP)
    await acct.wait_settled(qid, None)
    [sent] = acct.transport.sends
    assert sent.tokens == ("tok-1", "tok-2")
    assert acct.tokens.calls == [(ACCOUNT, None), (ACCOUNT, "tok-1")]
    assert acct.events.of("bob@example.net") == ["sent"]
    assert acct.status.reports == [] and acct.dsns() == []


async def test_a_refused_grant_defers_reports_and_warns_the_sender_once(
        acct: Harness) -> None:
    acct.tokens.fail = AccountAuthError("token endpoint refused the grant: invalid_grant",
                                        server_text="invalid_grant")
    rcpts = ("bob@example.net", "carol@example.org")
    qid = await acct.queue(*rcpts, user=REP)
    await acct.wait_settled(qid, "deferred")
    env = acct.deferred(qid)
    [reply] = {r.last_reply or "" for r in env.recipients}
    assert reply.startswith("454 4.7.8 account rep-mailbox needs reconnecting")
    assert "invalid_grant" in reply
    assert [r.status for r in env.recipients] == ["pending", "pending"]
    assert env.delay_notified
    assert acct.status.reports == [(ACCOUNT, reply)]

    # one delayed DSN to the sender, by the smarthost, never by the account
    await wait_for(lambda: len(acct.dsns()) == 1 and acct.scheduler.busy == 0,
                   what="the delayed DSN")
    [dsn_send] = [s for s in acct.transport.sends if s.mail_from == ""]
    assert dsn_send.rcpts == (SENDER,)
    assert dsn_send.dest is not None and dsn_send.dest.where == "relay.test:2525"
    dsn = dsn_send.data
    assert dsn.count(b"Action: delayed") == 2 and dsn.count(b"Status: 4.7.8") == 2
    assert b"Action: failed" not in dsn
    assert b"needs reconnecting" in dsn and b"Delayed Mail" in dsn
    assert re.findall(rb"Final-Recipient: rfc822; *(\S+)", dsn) == [r.encode() for r in rcpts]

    # the next attempt is refused too: reported again, the sender is not warned twice
    acct.clock.advance(60)
    await wait_for(lambda: len(acct.tokens.calls) == 2, what="the second attempt")
    await acct.wait_settled(qid, "deferred")
    assert len(acct.status.reports) == 2
    assert len(acct.dsns()) == 1 and acct.scheduler.stats.delayed_dsns == 1

    # reconnected: the message goes, nothing ever bounced
    acct.tokens.fail = None
    acct.clock.advance(60)
    await acct.wait_settled(qid, None)
    for r in rcpts:
        assert acct.events.of(r) == ["deferred", "deferred", "sent"]
    assert acct.scheduler.stats.bounced == 0 and acct.scheduler.stats.dsns == 0
    assert len(acct.dsns()) == 1


async def test_a_token_refused_twice_by_the_upstream_needs_reconnecting(
        acct: Harness) -> None:
    acct.transport.refuse_tokens = {"tok-1", "tok-2"}
    qid = await acct.queue("bob@example.net", user=REP)
    await acct.wait_settled(qid, "deferred")
    [rcpt] = acct.deferred(qid).recipients
    assert rcpt.last_reply is not None and rcpt.last_reply.startswith("454 4.7.8 account "
                                                                      "rep-mailbox needs")
    assert acct.tokens.calls == [(ACCOUNT, None), (ACCOUNT, "tok-1")]
    assert acct.status.reports == [(ACCOUNT, rcpt.last_reply)]
    await wait_for(lambda: len(delayed_dsns(acct)) == 1, what="the delayed DSN")


async def test_a_token_endpoint_outage_defers_without_reconnect_or_dsn(acct: Harness) -> None:
    acct.tokens.fail = AccountUnavailable("token endpoint https://idp.test/token unreachable")
    qid = await acct.queue("bob@example.net", user=REP)
    await acct.wait_settled(qid, "deferred")
    env = acct.deferred(qid)
    reply = env.recipients[0].last_reply
    assert reply is not None and reply.startswith("451 4.7.0 ")
    assert "account rep-mailbox" in reply and "unreachable" in reply
    assert acct.status.reports == [] and acct.dsns() == [] and not env.delay_notified


async def test_no_token_source_defers(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", account_config())
    h.scheduler.tokens = None
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, "deferred")
        reply = h.deferred(qid).recipients[0].last_reply
        assert reply is not None and reply.startswith("451 4.7.0 ")
        assert "no OAuth token source" in reply
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_expiry_still_bounces_once_after_the_delay_warning(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", account_config(give_up_after=120.0))
    h.tokens.fail = AccountAuthError("token endpoint refused the grant: invalid_grant")
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, "deferred")
        h.clock.advance(60)
        await wait_for(lambda: len(h.tokens.calls) == 2, what="the second attempt")
        await h.wait_settled(qid, "deferred")
        h.clock.advance(60)
        await h.wait_settled(qid, None)
        await wait_for(lambda: len(h.dsns()) == 2 and h.scheduler.busy == 0, what="the DSNs")
        delayed, failed = h.dsns()
        assert b"Action: delayed" in delayed
        assert b"Action: failed" in failed and b"Status: 4.4.7" in failed
        assert b"needs reconnecting" in failed
        assert all(s.dest is not None and s.dest.host == "relay.test"
                   for s in h.transport.sends if s.mail_from == "")
        assert h.events.of("bob@example.net") == ["deferred", "deferred", "bounced"]
        assert (h.scheduler.stats.dsns, h.scheduler.stats.delayed_dsns) == (1, 1)
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


@pytest.mark.parametrize("smarthost", [True, False], ids=["smarthost", "mx"])
async def test_a_dsn_never_goes_by_route_account(tmp_path: Path, smarthost: bool) -> None:
    h = Harness(tmp_path / "spool", account_config(smarthost=smarthost))
    await h.scheduler.start()
    try:
        h.transport.script("bob@example.net", "550 5.1.1 no such user")
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, None)
        await wait_for(lambda: len(h.dsns()) == 1 and h.scheduler.busy == 0, what="the DSN")
        [dsn_send] = [s for s in h.transport.sends if s.mail_from == ""]
        if smarthost:
            assert dsn_send.dest is not None and dsn_send.dest.where == "relay.test:2525"
        else:
            assert dsn_send.dest is None and dsn_send.domain == "gw.test"
        # a bounce spooled with route account and a user goes the same way
        await h.queue("x@example.org", mail_from="", user=REP, route="account",
                      is_bounce=True)
        await wait_for(lambda: len(h.transport.sent_to("x@example.org")) == 1
                       and h.scheduler.busy == 0, what="the bounce")
        [bounce] = h.transport.sent_to("x@example.org")
        assert (bounce.dest is None) != smarthost
        assert len(account_sends(h)) == 1  # only the original message went there
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_530_without_credentials_defers_and_warns_the_sender(tmp_path: Path) -> None:
    # a password account without a password: the upstream gets no AUTH
    h = Harness(tmp_path / "spool", account_config({"method": "password"}))
    await h.scheduler.start()
    try:
        h.transport.script("bob@example.net", "530 5.7.0 Authentication required")
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, "deferred")
        [dest] = account_sends(h)
        assert dest.username is None and dest.mechanism is None and dest.account == ACCOUNT
        [rcpt] = h.deferred(qid).recipients
        assert rcpt.status == "pending" and rcpt.last_reply is not None
        assert rcpt.last_reply.startswith("454 4.7.0 host smtp.example.com:587 demands "
                                          "authentication (530 5.7.0 Authentication required)")
        assert rcpt.last_reply.endswith("account rep-mailbox has no SMTP credentials configured")
        assert h.events.of("bob@example.net") == ["deferred"]
        await wait_for(lambda: len(delayed_dsns(h)) == 1 and h.scheduler.busy == 0,
                       what="the delayed DSN")
        assert b"no working credentials" in delayed_dsns(h)[0]
        assert h.status.reports == []  # nothing to reconnect: an admin adds the credentials
        h.clock.advance(60)
        await h.wait_sends("bob@example.net", 2)
        await h.wait_settled(qid, "deferred")
        assert len(h.dsns()) == 1 and h.scheduler.stats.bounced == 0
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_530_from_a_smarthost_without_credentials_defers_without_dsn(h: Harness) -> None:
    h.transport.script("a@example.test", "530 5.7.0 Authentication required")
    qid = await h.queue("a@example.test")
    await h.wait_settled(qid, "deferred")
    reply = h.deferred(qid).recipients[0].last_reply
    assert reply is not None and reply.startswith("454 4.7.0 host relay.test:2525 demands")
    assert reply.endswith("no SMTP credentials are configured for it")
    assert h.dsns() == []


async def test_a_password_account_logs_in_as_before(tmp_path: Path) -> None:
    secret = tmp_path / "rep.pw"
    secret.write_text("upstream-secret\n")
    h = Harness(tmp_path / "spool", account_config(
        {"method": "password", "username": "rep.upstream", "password_file": str(secret)}))
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, None)
        [dest] = account_sends(h)
        assert (dest.username, dest.password, dest.mechanism, dest.token) == (
            "rep.upstream", "upstream-secret", None, None)
        assert h.tokens.calls == []
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


class StoredAccounts:
    """An AccountDirectory with one account the configuration does not know."""

    def __init__(self, account: Account) -> None:
        self.acct = account
        self.asked: list[str] = []

    def account(self, account_id: str) -> Account | None:
        return self.acct if account_id == self.acct.id else None

    def accounts(self) -> Sequence[Account]:
        return [self.acct]

    def account_for_user(self, login: str) -> Account | None:
        self.asked.append(login)
        return self.acct if login == "stored@gw.test" else None


async def test_the_account_comes_from_the_directory(tmp_path: Path) -> None:
    stored = Account.model_validate({
        "id": "stored-1", "email": "stored@example.com", "auth": OAUTH,
        "smtp": {"host": "smtp.stored.test", "port": 465, "tls": "implicit"},
        "sync": {"enabled": False}})
    directory = StoredAccounts(stored)
    h = Harness(tmp_path / "spool", account_config(), directory=directory)
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user="stored@gw.test")
        await h.wait_settled(qid, None)
        [sent] = h.transport.sends
        assert sent.dest is not None and sent.dest.where == "smtp.stored.test:465"
        assert (sent.dest.account, sent.dest.username) == ("stored-1", "stored@example.com")
        assert h.tokens.calls == [("stored-1", None)]
        # a user the directory does not know (the config's REP included) falls back
        qid = await h.queue("bob@example.net", user=REP)
        await h.wait_settled(qid, None)
        assert h.transport.sends[-1].dest is not None
        assert h.transport.sends[-1].dest.where == "relay.test:2525"
        assert directory.asked == ["stored@gw.test", REP]
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


class Secrets:
    """A SecretSource: the stored passwords of accounts created at run time."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.asked: list[str] = []

    async def password(self, account_id: str) -> str:
        self.asked.append(account_id)
        if account_id not in self.passwords:
            raise AccountAuthError(f"account {account_id} has no password: connect it")
        return self.passwords[account_id]


async def test_a_runtime_password_account_logs_in_with_its_stored_password(
        tmp_path: Path) -> None:
    stored = Account.model_validate({
        "id": "stored-1", "email": "stored@example.com",
        "smtp": {"host": "smtp.stored.test", "port": 587, "tls": "starttls"},
        "sync": {"enabled": False}}).model_copy(update={"origin": "runtime"})
    h = Harness(tmp_path / "spool", account_config(), directory=StoredAccounts(stored))
    secrets = Secrets({"stored-1": "stored-secret"})
    h.scheduler.secrets = secrets
    await h.scheduler.start()
    try:
        qid = await h.queue("bob@example.net", user="stored@gw.test")
        await h.wait_settled(qid, None)
        [sent] = h.transport.sends
        assert sent.dest is not None
        assert (sent.dest.username, sent.dest.password, sent.dest.account) == (
            "stored@example.com", "stored-secret", "stored-1")
        assert secrets.asked == ["stored-1"]

        # its password gone from the store: deferred, reported, the sender warned once
        secrets.passwords.clear()
        qid = await h.queue("bob@example.net", user="stored@gw.test")
        await h.wait_settled(qid, "deferred")
        reply = h.deferred(qid).recipients[0].last_reply or ""
        assert reply.startswith("454 4.7.8 account stored-1 needs reconnecting")
        assert h.status.reports == [("stored-1", reply)]
        await wait_for(lambda: len(delayed_dsns(h)) == 1, what="the delayed DSN")
        assert len(h.transport.sends) == 2  # the first message and the DSN, by the smarthost
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


async def test_per_recipient_copies_of_one_message_warn_the_sender_once(acct: Harness) -> None:
    acct.tokens.fail = AccountAuthError("token endpoint refused the grant: invalid_grant",
                                        server_text="invalid_grant")
    copies = [await acct.queue(r, user=REP, group="G1")
              for r in ("bob@example.net", "carol@example.org", "dan@example.com")]
    for qid in copies:
        await acct.wait_settled(qid, "deferred")
    await wait_for(lambda: acct.scheduler.busy == 0, what="the scheduler idle")
    assert len(delayed_dsns(acct)) == 1                 # one message, one warning
    assert all(acct.deferred(q).delay_notified for q in copies)
    other = await acct.queue("erin@example.net", user=REP, group="G2")
    await acct.wait_settled(other, "deferred")
    await wait_for(lambda: len(delayed_dsns(acct)) == 2, what="the other message's warning")


# -- scheduled send (X-Mailgw-Send-At) ------------------------------------------------


async def test_a_scheduled_send_waits_without_an_attempt_or_event(h: Harness) -> None:
    rcpt = "a@example.test"
    qid = await h.queue(rcpt, scheduled_for=h.t0 + 3600)
    await h.wait_settled(qid, "deferred")
    env = h.deferred(qid)
    assert env.next_attempt == h.t0 + 3600 and env.attempts == 0
    assert env.recipients[0].attempts == 0 and env.recipients[0].last_reply is None
    assert h.transport.sent_to(rcpt) == [] and h.events.of(rcpt) == []

    h.scheduler.retry_now()          # the daemon's `queue retry` sends nothing early
    await h.timer_tick()
    h.clock.advance(3599)
    await h.timer_tick()
    assert h.transport.sent_to(rcpt) == [] and h.events.of(rcpt) == []
    assert h.state(qid) == "deferred"
    h.clock.advance(1)
    await h.wait_settled(qid, None)
    [sent] = h.transport.sent_to(rcpt)
    assert sent.at == h.t0 + 3600
    assert h.events.of(rcpt) == ["sent"]
    [ev] = [e for e in h.events.events if e.recipient == rcpt]
    assert ev.details["attempt"] == 1 and ev.at.timestamp() == h.t0 + 3600


async def test_a_scheduled_send_survives_a_restart_and_a_release(h: Harness) -> None:
    rcpt = "a@example.test"
    qid = await h.queue(rcpt, scheduled_for=h.t0 + 600, notify=False)  # crash before a look
    await h.scheduler.stop(timeout=5)
    h.scheduler = h.new_scheduler()
    await h.scheduler.start()            # the scan finds it in incoming/ and defers it
    await h.wait_settled(qid, "deferred")
    await h.scheduler.stop(timeout=5)
    h.spool.move(qid, "deferred", "incoming")   # `queue retry`/`release` by hand
    h.scheduler = h.new_scheduler()
    await h.scheduler.start()
    await h.wait_settled(qid, "deferred")
    assert h.transport.sent_to(rcpt) == [] and h.deferred(qid).attempts == 0
    h.clock.advance(600)
    await h.wait_settled(qid, None)
    assert h.events.of(rcpt) == ["sent"]


async def test_a_deleted_scheduled_send_delivers_nothing(h: Harness) -> None:
    rcpt = "a@example.test"
    qid = await h.queue(rcpt, scheduled_for=h.t0 + 60)
    await h.wait_settled(qid, "deferred")
    assert h.spool.delete(qid) == "deferred"
    h.clock.advance(120)
    await h.timer_tick()
    assert h.transport.sent_to(rcpt) == [] and h.events.of(rcpt) == []


async def test_expiry_of_a_scheduled_send_counts_from_its_time(tmp_path: Path) -> None:
    h = Harness(tmp_path / "spool", make_config([600.0], give_up_after=3600.0))
    await h.scheduler.start()
    try:
        rcpt = "a@example.test"
        h.transport.script(rcpt, "451 4.2.0 busy", "451 4.2.0 busy", "451 4.2.0 busy")
        qid = await h.queue(rcpt, scheduled_for=h.t0 + 7200)   # later than give_up_after
        await h.wait_settled(qid, "deferred")
        h.clock.advance(7200)
        await h.wait_sends(rcpt, 1)
        await h.wait_settled(qid, "deferred")        # not expired: 0 s since its time
        env = h.deferred(qid)
        assert env.attempts == 1 and env.next_attempt == h.t0 + 7200 + 600
        h.clock.advance(3600)                         # 3600 s after the scheduled time
        await h.wait_settled(qid, None)
        await wait_for(lambda: h.scheduler.busy == 0 and len(h.dsns()) == 1, what="the DSN")
        assert h.events.of(rcpt) == ["deferred", "bounced"]
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


# -- poison messages: attempts that raise ------------------------------------------------

class CrashingTransport(MemoryTransport):
    """A MemoryTransport whose sends carrying a recipient in `poison` raise, as a bug
    meeting odd input would."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.poison: set[str] = set()

    async def send(self, dest: Destination, mail_from: str, rcpts: list[str],
                   data: bytes) -> list[RcptResult]:
        if self.poison.intersection(rcpts):
            self.sends.append(Sent(mail_from, tuple(rcpts), data, self.clock(), dest=dest))
            raise RuntimeError("transport bug: boom")
        return await super().send(dest, mail_from, rcpts, data)


@pytest.fixture
async def crashy(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "state" / "spool",
                      make_config([60.0, 300.0], give_up_after=86400.0, max_crashes=3))
    transport = CrashingTransport(clock=harness.clock)
    transport.poison = {"poison@example.test"}
    harness.transport = transport
    harness.scheduler = harness.new_scheduler()
    await harness.scheduler.start()
    try:
        yield harness
    finally:
        await harness.scheduler.stop(timeout=5)
        harness.spool.close()


async def test_twenty_poison_messages_do_not_stop_a_good_one(crashy: Harness) -> None:
    h = crashy
    bad = [await h.queue("poison@example.test") for _ in range(20)]
    good = await h.queue("a@example.test")
    # two workers, twenty crashing entries ahead: each crash frees its worker at once
    await wait_for(lambda: h.state(good) is None, timeout=5, what="the good message sent")
    assert h.events.of("a@example.test") == ["sent"]
    for qid in bad:
        await h.wait_settled(qid, "deferred")
        env = h.deferred(qid)
        # counted on disk, retried with the schedule's backoff (not hot-looped)
        assert env.crashes == 1 and env.last_error == "RuntimeError: transport bug: boom"
        assert env.next_attempt == h.t0 + 60
    await h.timer_tick()
    assert len(h.transport.sent_to("poison@example.test")) == 20


async def test_a_poison_message_is_held_after_max_crashes_and_a_restart_keeps_the_count(
        crashy: Harness) -> None:
    h = crashy
    qid = await h.queue("poison@example.test")
    await h.wait_settled(qid, "deferred")
    assert h.deferred(qid).crashes == 1

    # a restart keeps the count (it is in the queue file)
    await h.scheduler.stop(timeout=5)
    h.scheduler = h.new_scheduler()
    await h.scheduler.start()
    assert h.deferred(qid).crashes == 1
    # a deferred entry that raises is rescheduled too, with the next backoff
    h.clock.advance(60)
    await h.wait_sends("poison@example.test", 2)
    await wait_for(lambda: h.state(qid) == "deferred" and h.deferred(qid).crashes == 2
                   and h.scheduler.busy == 0, what="the second crash counted")
    assert h.deferred(qid).next_attempt == h.t0 + 60 + 300

    h.clock.advance(300)
    await h.wait_settled(qid, "hold")
    env = h.spool.read_envelope("hold", qid)
    assert env.crashes == 3
    assert env.hold_reason == ("delivery crashed 3 times, last: RuntimeError: transport bug: "
                               "boom")
    assert b"mailgw_queue_poison_total 1.0" in await h.scheduler.metrics.collect()
    # this scheduler (since the restart) saw two of the three crashes
    assert b"mailgw_delivery_crashes_total 2.0" in await h.scheduler.metrics.collect()
    # held means held: no more attempts
    h.clock.advance(3600)
    await h.timer_tick()
    assert len(h.transport.sent_to("poison@example.test")) == 3

    # `queue list` and `queue show` give the reason; `queue release` clears the count
    cfg = h.spool.root.parent.parent / "gateway.yaml"
    cfg.write_text(f"hostname: gw.test\nstate_dir: {h.spool.root.parent}\n")
    listing = run_cli(cfg, "queue", "list")
    assert f"{qid}  hold" in listing
    assert "held: delivery crashed 3 times, last: RuntimeError: transport bug: boom" in listing
    assert "hold_reason: delivery crashed 3 times" in run_cli(cfg, "queue", "show", qid)
    assert isinstance(h.transport, CrashingTransport)
    h.transport.poison.clear()   # the bug is fixed
    run_cli(cfg, "queue", "release", qid)
    await h.wait_settled(qid, None)
    assert h.events.of("poison@example.test") == ["sent"]


def run_cli(config: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_release_clears_the_crash_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.setup()
    env = Envelope(id=new_queue_id(), mail_from=SENDER, recipients=[Recipient("a@x.test")],
                   crashes=3, last_error="E: x", hold_reason="delivery crashed 3 times")
    await spool.put(env, DATA, state="hold")
    spool.release(env.id)
    back = spool.read_envelope("incoming", env.id)
    assert (back.crashes, back.last_error, back.hold_reason) == (0, None, None)
    spool.close()


class DsnSpoolFails:
    """Wraps `Spool.put` so that spooling a DSN (a bounce envelope) raises SpoolError while
    `failing` is set; every other write goes through."""

    def __init__(self, spool: Spool) -> None:
        self.real = spool.put
        self.failing = True
        self.refused = 0

    async def __call__(self, env: Envelope, data: bytes, state: str = "incoming") -> None:
        from gateway.errors import SpoolError

        if env.is_bounce and self.failing:
            self.refused += 1
            raise SpoolError("Insufficient disk space in the spool, try again later")
        await self.real(env, data, state)


@pytest.mark.parametrize("recovers", [True, False])
async def test_a_dsn_that_cannot_be_spooled_never_resends_to_delivered_recipients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recovers: bool) -> None:
    """A partial delivery whose DSN cannot be spooled: the delivered recipient is recorded
    as sent (it is never sent the message again), the DSN is owed in the envelope and
    retried on the schedule, and given up after give_up_after."""
    h = Harness(tmp_path / "spool", make_config([60.0], give_up_after=3600.0))
    put = DsnSpoolFails(h.spool)
    monkeypatch.setattr(h.spool, "put", put)
    await h.scheduler.start()
    try:
        ok, refused = "a@example.test", "b@example.test"
        h.transport.script(refused, "550 5.1.1 no such user")
        qid = await h.queue(ok, refused)
        await h.wait_settled(qid, "deferred")
        assert put.refused == 1
        env = h.deferred(qid)
        assert {r.addr: r.status for r in env.recipients} == {ok: "sent", refused: "bounced"}
        assert [d["rcpt"] for d in env.dsn_owed] == [refused] and env.crashes == 0
        put.failing = not recovers
        h.clock.advance(60)
        await wait_for(lambda: put.refused == 2 or h.state(qid) is None, what="the DSN retry")
        if recovers:
            await h.wait_settled(qid, None)
            await wait_for(lambda: len(h.dsns()) == 1, what="the DSN delivered")
            [dsn] = h.dsns()
            assert re.findall(rb"Final-Recipient: rfc822; *(\S+)", dsn) == [refused.encode()]
        else:
            await h.wait_settled(qid, "deferred")
            h.clock.advance(3600)   # past give_up_after since the DSN was first owed
            await h.wait_settled(qid, None)
            assert h.dsns() == []
        assert len(h.transport.sent_to(ok)) == 1 and len(h.transport.sent_to(refused)) == 1
        assert h.events.of(ok) == ["sent"] and h.events.of(refused) == ["bounced"]
    finally:
        await h.scheduler.stop(timeout=5)
        h.spool.close()


# -- done/: a delivered entry stays in the spool until the store writer has written it ----

class JournalEvents(Events):
    """An EventSink with the StoreWriter's sequence marks, "written" only when the test
    says (`write()`): a writer whose store is down until then."""

    def __init__(self) -> None:
        super().__init__()
        self.items = 0
        self.flushed = 0
        self._written = asyncio.Event()
        #: copies whose record is expected or added, not written (StoreWriter.owes_record)
        self.unrecorded: set[str] = set()

    def add_accepted(self, a: AcceptedMessage) -> None:
        super().add_accepted(a)
        self.items += 1
        self.unrecorded.update(c.queue_id for c in a.copies or [Copy(a.queue_id)])

    def expect(self, qids: list[str]) -> None:
        self.unrecorded.update(qids)

    def owes_record(self, qid: str) -> bool:
        return qid in self.unrecorded

    def add_event(self, e: EventRecord) -> None:
        super().add_event(e)
        self.items += 1

    def mark(self) -> int:
        return self.items

    async def wait_flushed(self, timeout: float) -> bool:
        return await wait_event(self._written, timeout)

    def write_events_only(self) -> None:
        """Everything given so far is written, but the records expected (`expect`) and not
        added yet: a delivery that won the race with the relay's record."""
        self.flushed = self.items
        self._written.set()
        self._written = asyncio.Event()

    def write(self) -> None:
        """Everything given so far is written."""
        self.flushed = self.items
        self.unrecorded.clear()
        self._written.set()
        self._written = asyncio.Event()


@pytest.fixture
async def jh(tmp_path: Path, cfg: Config) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "spool", cfg)
    harness.events = JournalEvents()
    harness.scheduler = harness.new_scheduler()
    await harness.scheduler.start()
    try:
        yield harness
    finally:
        await harness.scheduler.stop(timeout=5)
        harness.spool.close()


def journal(h: Harness) -> JournalEvents:
    assert isinstance(h.events, JournalEvents)
    return h.events


async def test_a_delivered_entry_waits_in_done_until_its_events_are_written(
        jh: Harness) -> None:
    """Delivered before the writer flushed: the entry is in done/ with every recipient's
    outcome (for a replay), out of every queued state, never delivered again; written, it
    goes."""
    ok, refused = "a@example.test", "b@example.test"
    jh.transport.script(refused, "550 5.1.1 no such user")
    qid = await jh.queue(ok, refused)
    await jh.wait_settled(qid, "done")
    env = jh.spool.read_envelope("done", qid)
    assert [(r.addr, r.status, r.last_attempt, r.last_status) for r in env.recipients] == [
        (ok, "sent", 1, "2.0.0"), (refused, "bounced", 1, "5.1.1")]
    assert all(r.last_at == jh.t0 for r in env.recipients)
    assert [(e.type, e.key) for e in journal(jh).events if e.queue_id == qid] == [
        ("sent", f"sent:{qid}:{ok}"), ("bounced", f"bounced:{qid}:{refused}")]
    assert qid not in [q for _, q in jh.spool.iter_all(QUEUED_STATES)]
    jh.clock.advance(3600)
    await jh.timer_tick()
    assert len(jh.transport.sent_to(ok)) == 1 and jh.state(qid) == "done"
    journal(jh).write()
    await wait_for(lambda: jh.state(qid) is None, what="the done/ entry removed once written")


async def test_a_restart_replays_the_same_keyed_events_and_removes_done(jh: Harness) -> None:
    """A kill before the writer flushed: the next start finds the entry in done/; the
    events rebuilt from it are the ones recorded live (same keys and details, so the store
    keeps one of each), and done/ empties once they are written."""
    ok, refused = "a@example.test", "b@example.test"
    jh.transport.script(refused, "550 5.1.1 no such user")
    qid = await jh.queue(ok, refused)
    await jh.wait_settled(qid, "done")
    live = [e for e in journal(jh).events if e.queue_id == qid]
    await jh.scheduler.stop(timeout=5)      # "killed": nothing was written

    replayed = outcome_events(jh.spool.read_envelope("done", qid))
    assert replayed == live
    jh.events = JournalEvents()             # a new process: a new writer
    for e in replayed:
        jh.events.add_event(e)
    jh.scheduler = jh.new_scheduler()
    await jh.scheduler.start()
    assert jh.state(qid) == "done"
    journal(jh).write()
    await wait_for(lambda: jh.state(qid) is None, what="done/ emptied after the replay")
    assert len(jh.transport.sent_to(ok)) == 1   # never delivered again


async def test_done_waits_while_the_journal_is_not_replayed(jh: Harness) -> None:
    """The app could not replay the journal at start (the store was down): entries stay
    in done/ even once written, until the replay ran (their events handed over again)."""
    jh.scheduler.reaping = False
    qid = await jh.queue("a@example.test")
    await jh.wait_settled(qid, "done")
    journal(jh).write()
    await jh.timer_tick()
    assert jh.state(qid) == "done"
    await jh.scheduler.journal_replayed()
    assert [e.type for e in journal(jh).events if e.queue_id == qid] == ["sent", "sent"]
    journal(jh).write()
    await wait_for(lambda: jh.state(qid) is None, what="done/ reaped after the replay")


async def test_entries_the_store_keeps_nothing_for_leave_at_once(jh: Harness) -> None:
    """A copy kept out of the store (`store: false`), a DSN, or with everything already
    written: nothing is owed to the writer, so the entry is removed at once."""
    journal(jh).write()
    a = await jh.queue("a@example.test", crm_store=False)
    b = await jh.queue("b@example.test", mail_from="", is_bounce=True)
    await jh.wait_settled(a, None)
    await jh.wait_settled(b, None)


async def test_a_deferred_entry_keeps_its_last_attempt_for_the_replay(jh: Harness) -> None:
    rcpt, done = "a@example.test", "b@example.test"
    jh.transport.script(rcpt, "451 4.2.0 busy")
    qid = await jh.queue(rcpt, done)
    await jh.wait_settled(qid, "deferred")
    env = jh.deferred(qid)
    tried = env.recipients[0]
    assert tried.last_at is not None
    assert [(e.type, e.key) for e in outcome_events(env)] == [
        ("deferred", f"deferred:{qid}:{rcpt}:{round(tried.last_at * 1000)}"),
        ("sent", f"sent:{qid}:{done}")]
    assert outcome_events(env) == [e for e in journal(jh).events if e.queue_id == qid]


def test_two_attempts_numbered_alike_get_two_deferred_keys() -> None:
    # a crash between an attempt's event and its rewrite numbers the next attempt the same
    env = Envelope(id="Q1", mail_from="a@example.test", recipients=[Recipient(
        "b@example.test", attempts=1, last_reply="451 4.2.0 busy", last_at=1000.0,
        last_attempt=1)])
    first = outcome_event(env, env.recipients[0])
    env.recipients[0].last_at, env.recipients[0].last_reply = 1300.0, "451 4.3.0 later"
    again = outcome_event(env, env.recipients[0])
    assert first is not None and again is not None and first.key != again.key
    assert first.details["attempt"] == again.details["attempt"] == 1


async def test_review_late_replay_keeps_done_until_the_replayed_items_are_written(
        jh: Harness) -> None:
    """Store down at start: delivered meanwhile, the writer 'flushed' the live events (the
    store dropped them: unknown queue id, record not rebuilt yet). After journal_replayed
    the entry must stay in done/ until the replayed items are written."""
    jh.scheduler.reaping = False
    qid = await jh.queue("a@example.test")
    await jh.wait_settled(qid, "done")
    journal(jh).write()          # live events "written" (dropped by the store as unknown)
    await jh.scheduler.journal_replayed()   # replayed record/events handed over, not written yet
    await jh.timer_tick()
    await asyncio.sleep(0.2)
    assert jh.state(qid) == "done", "removed before the replayed items were written"


# -- done/ keeps only the envelope once the record is written; the record race ------------

def accepted(qid: str) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id="<m1@gw.test>", from_addr=SENDER,
                           to_addrs=[], cc_addrs=[], subject="", date=None, snippet="",
                           size=len(DATA), recipients=["a@example.test"], user=None,
                           account=None, at=datetime.now(UTC), copies=[Copy(qid)], raw=DATA)


async def test_done_keeps_only_the_envelope_once_the_record_is_written(jh: Harness) -> None:
    """A store outage must not fill done/ with a copy of every delivered message: a copy
    whose record is written keeps its envelope alone (the events are rebuilt from it); one
    whose record is still owed keeps its bytes (a restart rebuilds the record from them)."""
    written = await jh.queue("a@example.test")
    await jh.wait_settled(written, "done")
    env, data = jh.spool.read("done", written)
    assert data == b"" and env.envelope_only
    assert [r.status for r in env.recipients] == ["sent"]
    assert [e.key for e in outcome_events(env)] == [f"sent:{written}:a@example.test"]

    owed = await jh.queue("b@example.test", notify=False)
    journal(jh).add_accepted(accepted(owed))
    jh.scheduler.notify(owed)
    await jh.wait_settled(owed, "done")
    env, data = jh.spool.read("done", owed)
    assert data == DATA and not env.envelope_only
    journal(jh).write()
    await wait_for(lambda: jh.state(written) is None and jh.state(owed) is None,
                   what="both done/ entries reaped once written")


async def test_a_delivery_before_its_record_is_added_waits_for_the_record(jh: Harness) -> None:
    """The relay announces a copy (`expect`) before it is spooled and adds its record after:
    the scan can deliver the copy in between. Its done/ entry must stay (with its bytes)
    until the record is written, whatever its mark says."""
    qid = new_queue_id(jh.clock())
    journal(jh).expect([qid])
    env = Envelope(id=qid, mail_from=SENDER, recipients=[Recipient("a@example.test")],
                   received_at=jh.clock())
    await jh.spool.put(env, DATA)
    jh.scheduler.notify(qid)
    await jh.wait_settled(qid, "done")
    assert jh.spool.read("done", qid)[1] == DATA
    journal(jh).write_events_only()       # its events, and everything before: written
    await jh.timer_tick()
    await asyncio.sleep(3 * SCAN)
    assert jh.state(qid) == "done", "reaped before the copy's record was written"
    journal(jh).add_accepted(accepted(qid))   # the relay's record, late
    journal(jh).write()
    await wait_for(lambda: jh.state(qid) is None, what="reaped once the record is written")


class FailingRewrite:
    """Wraps `Spool.rewrite` so that the first rewrite raises SpoolError (a full disk)."""

    def __init__(self, spool: Spool) -> None:
        self.real = spool.rewrite
        self.failures = 1

    async def __call__(self, env: Envelope, data: bytes, old_state: str,
                       new_state: str) -> bool:
        from gateway.errors import SpoolError

        if self.failures:
            self.failures -= 1
            raise SpoolError("Insufficient system storage in the spool, try again later")
        return await self.real(env, data, old_state, new_state)


async def test_a_rewrite_lost_to_a_full_disk_keeps_bounced_recipients_bounced(
        tmp_path: Path, cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry could not be rewritten after an attempt that sent to one recipient and
    bounced another: the next attempt restores both as they finished (status, reply, time),
    not every finished recipient as "sent" with the old file's empty fields."""
    h = Harness(tmp_path / "spool", cfg)
    h.events = JournalEvents()
    h.scheduler = h.new_scheduler()
    monkeypatch.setattr(h.spool, "rewrite", FailingRewrite(h.spool))
    ok, refused, later = "a@example.test", "b@example.test", "c@example.test"
    h.transport.script(refused, "550 5.1.1 no such user")
    h.transport.script(later, "451 4.2.0 busy", "250 ok")
    qid = await h.queue(ok, refused, later, notify=False)
    await h.scheduler.process("incoming", qid)     # the rewrite fails: the old file stays
    assert h.state(qid) == "incoming"
    first = h.clock()
    h.clock.advance(60)
    await h.scheduler.process("incoming", qid)     # c delivered: all done
    assert h.state(qid) == "done"
    env = h.spool.read_envelope("done", qid)
    got = {r.addr: (r.status, r.attempts, r.last_reply, r.last_status, r.last_at)
           for r in env.recipients}
    assert got[ok][:2] == ("sent", 1) and got[ok][4] == first
    assert got[refused] == ("bounced", 1, "550 5.1.1 no such user", "5.1.1", first)
    assert got[later][0] == "sent" and got[later][4] == first + 60   # its 1st attempt lost
    assert [e.type for e in outcome_events(env)] == ["sent", "bounced", "sent"]
    assert len(h.transport.sent_to(ok)) == 1 and len(h.transport.sent_to(refused)) == 1
    h.spool.close()


async def test_the_late_replay_reads_done_off_the_event_loop(
        jh: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long outage done/ holds thousands of entries: their envelopes are read in a
    thread, not on the event loop."""
    jh.scheduler.reaping = False
    qid = await jh.queue("a@example.test")
    await jh.wait_settled(qid, "done")
    readers: list[str] = []
    real = jh.spool.read_envelope

    def read_envelope(state: str, q: str) -> Envelope:
        readers.append(threading.current_thread().name)
        return real(state, q)

    monkeypatch.setattr(jh.spool, "read_envelope", read_envelope)
    await jh.scheduler.journal_replayed()
    assert readers and threading.main_thread().name not in readers
    assert [e.type for e in journal(jh).events if e.queue_id == qid] == ["sent", "sent"]
    journal(jh).write()
    await wait_for(lambda: jh.state(qid) is None, what="done/ reaped after the replay")


class FakeStore:
    def __init__(self) -> None:
        self.batches: list[tuple[list[AcceptedMessage], list[EventRecord]]] = []

    async def record(self, accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        self.batches.append((accepted, events))


async def test_the_writer_owes_a_record_from_expect_until_its_batch_is_written() -> None:
    store = FakeStore()
    writer = StoreWriter(store, max_delay=0.0)  # type: ignore[arg-type]
    writer.expect(["Q1", "Q2"])
    assert writer.owes_record("Q1") and writer.owes_record("Q2")
    writer.unexpect(["Q2"])                     # spooling failed: nothing owed
    assert not writer.owes_record("Q2")
    a = accepted("Q1")
    a.copies = [Copy("Q1"), Copy("Q3")]
    writer.add_accepted(a)
    assert writer.owes_record("Q1") and writer.owes_record("Q3")
    await writer.start()
    try:
        await wait_for(lambda: writer.flushed == 1, what="the batch written")
        assert not writer.owes_record("Q1") and not writer.owes_record("Q3")
    finally:
        assert await writer.stop(5.0) == 0


async def test_the_relay_announces_its_copies_before_they_are_visible(tmp_path: Path) -> None:
    """The rename into incoming/ happens inside put_all: from then on the scheduler's scan
    can deliver the copy, so the writer must owe its record already."""
    spool = Spool(tmp_path / "spool")
    spool.setup()
    writer = StoreWriter(FakeStore())  # type: ignore[arg-type]
    seen: list[bool] = []
    real = spool.put_all

    async def put_all(items: list[tuple[Envelope, bytes]], state: str = "incoming") -> None:
        seen.extend(writer.owes_record(env.id) for env, _ in items)
        await real(items, state)

    spool.put_all = put_all  # type: ignore[method-assign]
    relay = Relay(spool, "gw.test", events=writer)
    qid = await relay.accept(Submission(mail_from=SENDER, rcpts=["a@example.test"], data=DATA))
    assert seen == [True] and writer.owes_record(qid)

    async def full(items: list[tuple[Envelope, bytes]], state: str = "incoming") -> None:
        from gateway.errors import SpoolError
        raise SpoolError("Insufficient system storage in the spool, try again later")

    spool.put_all = full  # type: ignore[method-assign]
    before = set(writer._unrecorded)
    with pytest.raises(MailError):
        await relay.accept(Submission(mail_from=SENDER, rcpts=["b@example.test"], data=DATA))
    assert writer._unrecorded == before        # the refused message owes nothing
    spool.close()
