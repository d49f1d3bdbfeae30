"""SMTPTransport against real aiosmtpd upstreams on loopback: results, TLS, AUTH, pooling, limits."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.smtp import SMTPTransport
from gateway.delivery.transport import Destination, RcptResult, parse_reply
from tests.support.tlscert import CertFiles, make_cert
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

FROM = "sender@gw.test"
MESSAGE = (
    b"From: Sender <sender@gw.test>\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: transparency\r\n"
    b"Message-ID: <m1@gw.test>\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"a lone dot above must not end DATA\r\n"
)


@pytest.fixture(autouse=True, params=[False, True], ids=["sequential", "pipelining"])
def upstream_pipelining(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every case runs against upstreams without and with PIPELINING (MAIL, RCPT and DATA in
    one write): the results must be the same."""
    monkeypatch.setattr(Upstream, "PIPELINING", request.param)
    return bool(request.param)


@pytest.fixture
async def transport() -> AsyncIterator[SMTPTransport]:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, idle_timeout=30)
    yield t
    await t.close()


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return make_cert(tmp_path / "tls")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def dest(up: Upstream, **kw: Any) -> Destination:
    return Destination(host="127.0.0.1", port=up.port, **kw)


def message(n: int) -> bytes:
    return MESSAGE.replace(b"transparency", b"transparency %d" % n)


# -- results --------------------------------------------------------------------------


async def test_reuses_one_connection_and_delivers_bytes_unchanged(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        for i in range(5):
            [res] = await transport.send(dest(up), FROM, ["rcpt@example.test"], message(i))
            assert res.ok, res
            assert res.code == 250 and res.status == "2.0.0"
            assert res.remote == f"127.0.0.1[127.0.0.1]:{up.port}"
        got = await up.wait_for(5)
    assert transport.connections_opened == 1
    assert transport.connections_reused == 4
    assert up.connections == 1
    assert [m.data for m in got] == [message(i) for i in range(5)]
    assert {m.session for m in got} == {1}
    assert got[0].mail_from == FROM and got[0].rcpt_tos == ("rcpt@example.test",)


async def test_bare_lf_is_sent_as_crlf(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        [res] = await transport.send(dest(up), FROM, ["r@example.test"],
                                     b"Subject: lf\n\n.dot\nend")
        assert res.ok
        [got] = await up.wait_for(1)
    assert got.data == b"Subject: lf\r\n\r\n.dot\r\nend\r\n"


async def test_mixed_rcpt_results_in_order(transport: SMTPTransport) -> None:
    async with Upstream(rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}) as up:
        res = await transport.send(dest(up), FROM,
                                   ["good@example.test", "bad@example.test"], MESSAGE)
        [got] = await up.wait_for(1)
    assert [r.rcpt for r in res] == ["good@example.test", "bad@example.test"]
    assert res[0].ok
    assert res[1].permanent and res[1].code == 550 and res[1].status == "5.1.1"
    assert res[1].reply == "550 5.1.1 no such user"
    assert got.rcpt_tos == ("good@example.test",)


async def test_451_to_data_is_temporary_for_every_accepted_rcpt(transport: SMTPTransport) -> None:
    async with Upstream(data_reply="451 4.3.0 queue full",
                        rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}) as up:
        res = await transport.send(dest(up), FROM,
                                   ["a@example.test", "b@example.test", "bad@example.test"],
                                   MESSAGE)
        assert up.messages == []
    assert [r.reply for r in res] == ["451 4.3.0 queue full", "451 4.3.0 queue full",
                                      "550 5.1.1 no such user"]
    assert res[0].temporary and res[1].temporary and res[2].permanent


async def test_552_to_data_is_permanent(transport: SMTPTransport) -> None:
    async with Upstream(data_reply="552 5.3.4 message too big") as up:
        res = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
    assert res[0].permanent and res[0].status == "5.3.4"


async def test_5xx_to_mail_from_is_permanent_for_all(transport: SMTPTransport) -> None:
    async with Upstream(mail_reply="553 5.7.1 sender not allowed") as up:
        res = await transport.send(dest(up), FROM, ["a@example.test", "b@example.test"],
                                   MESSAGE)
        # the connection stays usable: the next message reuses it after RSET
        up.mail_reply = None
        again = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
    assert all(r.permanent and r.status == "5.7.1" for r in res)
    assert again[0].ok
    assert transport.connections_opened == 1 and transport.connections_reused == 1


async def test_tempfail_first_then_accept(transport: SMTPTransport) -> None:
    async with Upstream(tempfail_first=1) as up:
        [first] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        [second] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        await up.wait_for(1)
    assert first.temporary and first.code == 451
    assert second.ok


async def test_connection_refused_is_temporary_441(transport: SMTPTransport,
                                                   closed_port: int) -> None:
    res = await transport.send(Destination(host="127.0.0.1", port=closed_port), FROM,
                               ["a@example.test", "b@example.test"], MESSAGE)
    assert [r.rcpt for r in res] == ["a@example.test", "b@example.test"]
    for r in res:
        assert r.temporary and r.code == 451 and r.status == "4.4.1"
        assert r.remote is None
        assert "Connection refused" in r.text
    assert transport.connections_opened == 0


async def test_no_rcpts_is_no_session(transport: SMTPTransport, closed_port: int) -> None:
    assert await transport.send(Destination(host="127.0.0.1", port=closed_port), FROM, [],
                                MESSAGE) == []


async def test_greeting_timeout_is_temporary() -> None:
    # a listener that accepts but never greets
    writers: list[asyncio.StreamWriter] = []

    def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = SMTPTransport("gw.test", connect_timeout=0.3, command_timeout=1)
    try:
        [res] = await t.send(Destination(host="127.0.0.1", port=port), FROM,
                             ["a@example.test"], MESSAGE)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        await t.close()
    assert res.temporary and res.status == "4.4.1" and "timed out" in res.text


# -- TLS --------------------------------------------------------------------------------


async def test_starttls_required_with_ca_file(transport: SMTPTransport, certs: CertFiles) -> None:
    async with Upstream(starttls=certs.server_context(), require_starttls=True) as up:
        d = dest(up, tls="starttls", tls_required=True, ca_file=str(certs.cert_file))
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        assert res.ok, res
        # reuse keeps the TLS session
        [res2] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        got = await up.wait_for(2)
    assert res2.ok
    assert all(m.tls for m in got)
    assert transport.connections_opened == 1


async def test_starttls_verifies_the_name_not_the_address(transport: SMTPTransport,
                                                          certs: CertFiles) -> None:
    async with Upstream(starttls=certs.server_context(), require_starttls=True) as up:
        good = Destination(host="localhost", address="127.0.0.1", port=up.port,
                           tls="starttls", tls_required=True, ca_file=str(certs.cert_file))
        [ok] = await transport.send(good, FROM, ["a@example.test"], MESSAGE)
        wrong = Destination(host="mx.elsewhere.test", address="127.0.0.1", port=up.port,
                            tls="starttls", tls_required=True, ca_file=str(certs.cert_file))
        [bad] = await transport.send(wrong, FROM, ["a@example.test"], MESSAGE)
    assert ok.ok, ok
    assert ok.remote == f"localhost[127.0.0.1]:{up.port}"
    assert bad.temporary and bad.status == "4.7.5", bad


async def test_starttls_untrusted_certificate_is_temporary_475(transport: SMTPTransport,
                                                               certs: CertFiles,
                                                               tmp_path: Path) -> None:
    other = make_cert(tmp_path / "other", stem="other")
    async with Upstream(starttls=certs.server_context()) as up:
        d = dest(up, tls="starttls", tls_required=True, ca_file=str(other.cert_file))
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        assert up.messages == []
    assert res.temporary and res.status == "4.7.5", res
    assert "certificate" in res.text


async def test_starttls_required_but_not_offered_is_temporary(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        d = dest(up, tls="starttls", tls_required=True)
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        assert up.messages == []
    assert res.temporary and res.status == "4.7.4"
    assert "not offered" in res.text


async def test_opportunistic_uses_tls_without_verification(transport: SMTPTransport,
                                                           certs: CertFiles) -> None:
    async with Upstream(starttls=certs.server_context()) as up:
        [res] = await transport.send(dest(up, tls="opportunistic"), FROM, ["a@example.test"],
                                     MESSAGE)
        [got] = await up.wait_for(1)
    assert res.ok and got.tls


async def test_opportunistic_without_starttls_sends_plaintext(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        [res] = await transport.send(dest(up, tls="opportunistic"), FROM, ["a@example.test"],
                                     MESSAGE)
        [got] = await up.wait_for(1)
    assert res.ok and not got.tls


async def test_implicit_tls(transport: SMTPTransport, certs: CertFiles) -> None:
    async with Upstream(implicit_tls=certs.server_context()) as up:
        d = dest(up, tls="implicit", ca_file=str(certs.cert_file))
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        by_name = Destination(host="localhost", address="127.0.0.1", port=up.port,
                              tls="implicit", ca_file=str(certs.cert_file))
        [res2] = await transport.send(by_name, FROM, ["a@example.test"], MESSAGE)
        got = await up.wait_for(2)
    assert res.ok, res
    assert res2.ok, res2
    assert all(m.tls for m in got)


async def test_implicit_tls_untrusted_is_temporary(transport: SMTPTransport, certs: CertFiles,
                                                   tmp_path: Path) -> None:
    other = make_cert(tmp_path / "other", stem="other")
    async with Upstream(implicit_tls=certs.server_context()) as up:
        d = dest(up, tls="implicit", ca_file=str(other.cert_file))
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
    assert res.temporary and res.status == "4.7.5", res


# -- AUTH -------------------------------------------------------------------------------


async def test_auth_login_success(transport: SMTPTransport) -> None:
    async with Upstream(auth=("alice", "s3cret")) as up:
        d = dest(up, username="alice", password="s3cret")
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
        [got] = await up.wait_for(1)
    assert res.ok, res
    assert got.login == "alice"


async def test_auth_535_is_temporary(transport: SMTPTransport) -> None:
    async with Upstream(auth=("alice", "s3cret")) as up:
        d = dest(up, username="alice", password="wrong")
        res = await transport.send(d, FROM, ["a@example.test", "b@example.test"], MESSAGE)
        assert up.messages == []
        assert up.auth_failures >= 1
    for r in res:
        assert r.temporary and r.code == 454 and r.status == "4.7.8", r
        assert "535" in r.text


async def test_a_refused_login_is_one_auth_attempt_per_connection_and_keeps_5_7_8(
        transport: SMTPTransport) -> None:
    """PLAIN refused with 535: no LOGIN after it (each try counts toward the provider's
    lockout), and the upstream's own reply, enhanced code included, is what is recorded."""
    async with Upstream(auth=("alice", "s3cret")) as up:
        d = dest(up, username="alice", password="wrong")
        for _ in range(3):
            [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
            assert res.code == 454 and res.status == "4.7.8", res
            assert "535 5.7.8" in res.reply, res.reply
            assert "AUTH PLAIN" in res.reply, res.reply
        assert up.messages == []
        assert up.connections == 3
        assert up.password_attempts == [(1, "PLAIN"), (2, "PLAIN"), (3, "PLAIN")]
        assert up.auth_failures == 3


async def test_password_is_not_in_repr() -> None:
    d = Destination(host="smtp.example.test", port=587, tls="starttls", username="u",
                    password="hunter2")
    assert "hunter2" not in repr(d)
    with pytest.raises(ValueError):
        Destination(host="x", port=25, tls="tls")  # type: ignore[arg-type]  # invalid on purpose


# -- pooling ----------------------------------------------------------------------------


async def test_per_destination_limit() -> None:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, per_destination=2)
    try:
        async with Upstream(data_delay=0.05) as up:
            results = await asyncio.gather(*(
                t.send(dest(up), FROM, [f"r{i}@example.test"], message(i)) for i in range(6)))
            await up.wait_for(6)
    finally:
        await t.close()
    assert all(r.ok for [r] in results)
    assert up.max_active == 2
    assert t.connections_opened == 2
    assert t.connections_reused == 4


async def test_dead_pooled_connection_is_replaced(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        [first] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        up.drop_connections()
        await up.wait_until(lambda: up.active == 0, what="the connection to close")
        [second] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        await up.wait_for(2)
    assert first.ok and second.ok
    assert transport.connections_opened == 2


class CountingUpstream(Upstream):
    """Counts RSETs; with `mail_421_on_reuse`, answers 421 to a MAIL FROM on a session that
    has already delivered a message (an upstream closing an idle connection)."""

    def __init__(self, *, mail_421_on_reuse: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.rsets = 0
        self.mail_421_on_reuse = mail_421_on_reuse

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.rsets += 1
        return await super().handle_RSET(server, session, envelope)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        number = getattr(server, "number", 0)
        if self.mail_421_on_reuse and any(m.session == number for m in self.messages):
            return "421 4.4.2 idle too long, closing"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


async def test_clean_connection_is_reused_without_rset(transport: SMTPTransport) -> None:
    async with CountingUpstream() as up:
        for n in range(3):
            [res] = await transport.send(dest(up), FROM, ["a@example.test"], message(n))
            assert res.ok
        got = await up.wait_for(3)
    assert [m.session for m in got] == [1, 1, 1]
    assert transport.connections_opened == 1 and transport.connections_reused == 2
    assert up.rsets == 0


async def test_open_transaction_is_reset_before_reuse(transport: SMTPTransport) -> None:
    async with CountingUpstream(rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}) as up:
        [refused] = await transport.send(dest(up), FROM, ["bad@example.test"], MESSAGE)
        [ok] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        got = await up.wait_for(1)
    assert refused.permanent and ok.ok
    assert up.rsets == 1 and got[0].session == 1
    assert transport.connections_opened == 1 and transport.connections_reused == 1


async def test_421_to_rset_retries_on_a_fresh_connection(transport: SMTPTransport) -> None:
    async with Upstream(rset_reply="421 4.4.2 idle too long, closing",
                        rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}) as up:
        # every recipient refused: the transaction stays open, so the next one starts with RSET
        [first] = await transport.send(dest(up), FROM, ["bad@example.test"], MESSAGE)
        [second] = await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        got = await up.wait_for(1)
    assert first.permanent and second.ok
    assert transport.connections_opened == 2 and transport.connections_reused == 0
    assert [m.session for m in got] == [2]


async def test_421_to_mail_on_a_reused_connection_retries_on_a_fresh_one(
        transport: SMTPTransport) -> None:
    async with CountingUpstream(mail_421_on_reuse=True) as up:
        [first] = await transport.send(dest(up), FROM, ["a@example.test"], message(1))
        [second] = await transport.send(dest(up), FROM, ["a@example.test"], message(2))
        got = await up.wait_for(2)
    assert first.ok and second.ok
    assert transport.connections_opened == 2 and transport.connections_reused == 0
    assert [m.session for m in got] == [1, 2]


async def test_idle_connections_close_after_idle_timeout() -> None:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, idle_timeout=0.05)
    try:
        async with Upstream() as up:
            [res] = await t.send(dest(up), FROM, ["a@example.test"], MESSAGE)
            assert res.ok
            await up.wait_until(lambda: up.active == 0, what="the idle connection to close")
            assert t.idle_connections == 0
    finally:
        await t.close()


async def test_a_connection_carries_at_most_reuse_count_messages() -> None:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, idle_timeout=60,
                      reuse_count=3)
    try:
        async with Upstream() as up:
            for i in range(7):
                [res] = await t.send(dest(up), FROM, ["a@example.test"], message(i))
                assert res.ok, res
            got = await up.wait_for(7)
            # the worn-out connections are closed with QUIT, not left open
            await up.wait_until(lambda: up.active == 1, what="worn-out connections closed")
    finally:
        await t.close()
    assert up.connections == 3
    assert [m.session for m in got] == [1, 1, 1, 2, 2, 2, 3]


async def test_a_connection_is_not_reused_after_reuse_time() -> None:
    now = [1000.0]
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, idle_timeout=600,
                      reuse_time=300, reuse_count=0, clock=lambda: now[0])
    try:
        async with Upstream() as up:
            for step in (0, 299, 1, 0):
                now[0] += step
                [res] = await t.send(dest(up), FROM, ["a@example.test"], MESSAGE)
                assert res.ok, res
            got = await up.wait_for(4)
    finally:
        await t.close()
    # opened at 1000; reused at 1299; at 1300 it is 300 s old: a fresh one carries the rest
    assert [m.session for m in got] == [1, 1, 2, 2]


async def test_close_quits_pooled_connections() -> None:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5, idle_timeout=60)
    async with Upstream() as up:
        await t.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        assert t.idle_connections == 1
        await t.close()
        await up.wait_until(lambda: up.active == 0, what="QUIT after close()")
        # still usable afterwards
        [res] = await t.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        assert res.ok
        await t.close()


async def test_different_credentials_do_not_share_connections(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        await transport.send(dest(up), FROM, ["a@example.test"], MESSAGE)
        await transport.send(dest(up, tls="opportunistic"), FROM, ["a@example.test"], MESSAGE)
        await up.wait_for(2)
    assert transport.connections_opened == 2


# -- extensions -------------------------------------------------------------------------


async def test_8bit_message_uses_8bitmime_when_offered(transport: SMTPTransport) -> None:
    body = b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n"
    async with Upstream() as up:
        [res] = await transport.send(dest(up), FROM, ["a@example.test"], body)
        [got] = await up.wait_for(1)
    assert res.ok and got.data == body
    assert "BODY=8BITMIME" in got.mail_options


async def test_8bit_message_is_sent_anyway_without_8bitmime(transport: SMTPTransport) -> None:
    body = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
    async with Upstream(hide={"8BITMIME"}) as up:
        [res] = await transport.send(dest(up), FROM, ["a@example.test"], body)
        [got] = await up.wait_for(1)
    assert res.ok and got.data == body
    assert not any(o.upper().startswith("BODY=") for o in got.mail_options)


async def test_utf8_envelope_uses_smtputf8(transport: SMTPTransport) -> None:
    async with Upstream() as up:
        [res] = await transport.send(dest(up), FROM, ["jos\u00e9@example.test"], MESSAGE)
        [got] = await up.wait_for(1)
    assert res.ok, res
    assert "SMTPUTF8" in got.mail_options
    assert got.rcpt_tos == ("jos\u00e9@example.test",)


async def test_utf8_envelope_without_smtputf8_bounces_567(transport: SMTPTransport) -> None:
    async with Upstream(hide={"SMTPUTF8"}) as up:
        [res] = await transport.send(dest(up), FROM, ["jos\u00e9@example.test"], MESSAGE)
    assert res.permanent and res.status == "5.6.7"


# -- reply parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "message", "expected"), [
    (250, "2.0.0 OK queued", (250, "2.0.0", "OK queued")),
    (250, "OK", (250, "2.0.0", "OK")),
    (550, "5.1.1 <x@y>: Recipient address rejected:\n5.1.1 User unknown",
     (550, "5.1.1", "<x@y>: Recipient address rejected: User unknown")),
    (451, "4.7.1 Greylisted", (451, "4.7.1", "Greylisted")),
    (550, "4.1.1 class mismatch", (550, "5.0.0", "4.1.1 class mismatch")),
    (421, "", (421, "4.0.0", "")),
    (354, "go ahead", (451, "4.5.0", "unexpected reply 354 go ahead")),
])
def test_parse_reply(code: int, message: str, expected: tuple[int, str, str]) -> None:
    assert parse_reply(code, message) == expected


def test_rcpt_result_properties() -> None:
    r = RcptResult.from_reply("a@b", 552, "5.2.2 mailbox full", "mx[192.0.2.1]:25")
    assert (r.ok, r.temporary, r.permanent) == (False, False, True)
    assert r.reply == "552 5.2.2 mailbox full"


# -- PIPELINING (RFC 2920) ------------------------------------------------------------------


async def test_pipelining_is_used_when_offered(transport: SMTPTransport,
                                               upstream_pipelining: bool) -> None:
    async with Upstream() as up:
        for n in range(3):
            [res] = await transport.send(dest(up), FROM, ["a@example.test"], message(n))
            assert res.ok
        await up.wait_for(3)
    assert transport.transactions_pipelined == (3 if upstream_pipelining else 0)
    assert transport.connections_opened == 1


class BatchServer:
    """A raw SMTP server that offers PIPELINING and answers every command that arrived in one
    segment with one write, as real servers do. `rcpt_codes` answers the RCPTs in turn;
    `data_despite_no_rcpt` says 354 to DATA even when no recipient was accepted (a server
    RFC 2920 tells clients to cope with)."""

    def __init__(self, rcpt_codes: list[str], data_despite_no_rcpt: bool = False,
                 mail_reply: str = "250 2.1.0 ok", hang_up_after_mail: bool = False) -> None:
        self.rcpt_codes = rcpt_codes
        self.data_despite_no_rcpt = data_despite_no_rcpt
        self.mail_reply = mail_reply
        self.hang_up_after_mail = hang_up_after_mail
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> BatchServer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 batch.test ESMTP\r\n")
        accepted = 0
        rcpt = 0
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                out = []
                for line in chunk.split(b"\r\n")[:-1]:
                    self.commands.append(line)
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        out.append(b"250-batch.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                    elif verb == b"MAIL":
                        accepted, rcpt = 0, 0
                        out.append(self.mail_reply.encode() + b"\r\n")
                        if self.hang_up_after_mail:
                            writer.write(b"".join(out))
                            return
                    elif verb == b"RCPT":
                        code = self.rcpt_codes[rcpt % len(self.rcpt_codes)]
                        rcpt += 1
                        accepted += code.startswith("250")
                        out.append(code.encode() + b"\r\n")
                    elif verb == b"DATA":
                        if accepted or self.data_despite_no_rcpt:
                            out.append(b"354 go ahead\r\n")
                            writer.write(b"".join(out))
                            out = []
                            body = b""
                            while b"\r\n.\r\n" not in b"\r\n" + body:
                                more = await reader.read(65536)
                                if not more:
                                    return
                                body += more
                            self.messages.append(body)
                            out.append(b"250 2.0.0 queued\r\n" if accepted
                                       else b"554 5.5.1 no valid recipients\r\n")
                        else:
                            out.append(b"554 5.5.1 no valid recipients\r\n")
                    elif verb == b"RSET":
                        out.append(b"250 2.0.0 ok\r\n")
                    elif verb == b"QUIT":
                        writer.write(b"".join(out) + b"221 2.0.0 bye\r\n")
                        return
                    else:
                        out.append(b"502 5.5.2 what\r\n")
                writer.write(b"".join(out))
        finally:
            writer.close()


async def test_pipelined_replies_in_one_segment(transport: SMTPTransport) -> None:
    async with BatchServer(["250 2.1.5 ok", "550 5.1.1 no such user"]) as srv:
        d = Destination(host="127.0.0.1", port=srv.port)
        res = await transport.send(d, FROM, ["a@example.test", "b@example.test"], MESSAGE)
        again = await transport.send(d, FROM, ["c@example.test", "d@example.test"], MESSAGE)
    assert [r.reply for r in res] == ["250 2.0.0 queued", "550 5.1.1 no such user"]
    assert again[0].ok and again[1].permanent
    assert transport.transactions_pipelined == 2
    assert transport.connections_opened == 1 and transport.connections_reused == 1
    assert b"RSET" not in srv.commands
    # dot-stuffed on the wire, terminated once
    assert srv.messages[0].endswith(b"\r\n..a line that starts with a dot\r\n...two dots\r\n"
                                    b"..\r\na lone dot above must not end DATA\r\n.\r\n")


async def test_pipelined_354_without_recipients_is_ended_and_reset(transport: SMTPTransport) -> None:
    async with BatchServer(["550 5.1.1 no such user"], data_despite_no_rcpt=True) as srv:
        d = Destination(host="127.0.0.1", port=srv.port)
        [res] = await transport.send(d, FROM, ["x@example.test"], MESSAGE)
        srv.rcpt_codes = ["250 2.1.5 ok"]
        [again] = await transport.send(d, FROM, ["y@example.test"], MESSAGE)
    assert res.reply == "550 5.1.1 no such user" and again.ok
    assert srv.messages[0] == b".\r\n"  # the empty message that ended the refused DATA
    assert srv.commands.count(b"RSET") == 1  # the open transaction was reset before reuse
    assert transport.connections_opened == 1


async def test_pipelined_mail_refusal_stands_when_the_server_hangs_up(
        transport: SMTPTransport) -> None:
    async with BatchServer(["250 2.1.5 ok"], mail_reply="550 5.7.1 sender not allowed",
                           hang_up_after_mail=True) as srv:
        d = Destination(host="127.0.0.1", port=srv.port)
        [res] = await transport.send(d, FROM, ["a@example.test"], MESSAGE)
    assert res.permanent and res.reply == "550 5.7.1 sender not allowed"
    assert transport.transactions_pipelined == 1 and transport.idle_connections == 0
