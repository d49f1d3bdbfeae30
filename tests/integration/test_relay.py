"""The submission relay end to end: real SMTP clients, the gateway, a real aiosmtpd upstream."""

from __future__ import annotations

import asyncio
import base64
import email
import json
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.harness import (
    PASSWORD,
    USER,
    Sink,
    cli,
    running_app,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Bcc: hidden@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <q1@example.com>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"the numbers are attached.  Trailing spaces stay.   \r\n"
)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


async def send(port: int, msg: bytes = MESSAGE, rcpts: list[str] | None = None,
               login: bool = True) -> dict[str, tuple[int, bytes]]:
    def go() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.ehlo("client.example.com")
            if login:
                c.login(USER, PASSWORD)
            return c.sendmail(USER, rcpts or ["bob@example.net"], msg)
    return await asyncio.to_thread(go)


async def test_relay_delivers_body_byte_for_byte(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port)
    async with running_app(cfg) as app:
        assert app.submission is not None
        await send(app.submission.port)
        await wait_until(lambda: len(sink.received) == 1, what="delivery to the upstream")
        mail_from, rcpts, data = sink.received[0]
        assert mail_from == USER and rcpts == ["bob@example.net"]
        assert body_of(data) == body_of(MESSAGE)
        head = data.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"Received: from client.example.com ([127.0.0.1])")
        assert b"with ESMTPA id " in head
        assert b"hidden@example.org" not in data and b"\r\nBcc:" not in data
        # apart from the trace header on top and Bcc, the header is as written
        assert head.split(b"\r\n", 3)[3] + b"\r\n" == MESSAGE.split(b"\r\n\r\n")[0].replace(
            b"Bcc: hidden@example.org\r\n", b"") + b"\r\n"
        assert app.writer is not None
        await wait_until(lambda: app.writer is not None and app.writer.pending == 0,
                         what="events written")
    out = cli(cfg, "messages", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["message_id"] == "<q1@example.com>" and row["subject"] == "Quarterly numbers"
    assert row["direction"] == "outbound" and row["sources"] == ["relay"]
    assert row["to"] == ["bob@example.net"] and row["from"] == "alice@example.com"
    types = [(e["type"], e["recipient"]) for e in row["events"]]
    assert types == [("queued", "bob@example.net"), ("sent", "bob@example.net")]
    assert row["events"][1]["details"]["reply"].startswith("250")


async def test_temporary_failure_is_retried(tmp_path: Path) -> None:
    sink = Sink(replies=["451 4.3.0 Try again later", None]).start()
    try:
        cfg = write_config(tmp_path, upstream_port=sink.port)
        async with running_app(cfg) as app:
            assert app.submission is not None and app.writer is not None
            await send(app.submission.port)
            await wait_until(lambda: len(sink.received) == 1, timeout=15,
                             what="delivery after the retry")
            await wait_until(lambda: app.spool.list_ids("deferred") == []
                             and app.spool.list_ids("incoming") == []
                             and app.spool.list_ids("done") == [], what="an empty spool")
            await wait_until(lambda: app.writer is not None and app.writer.pending == 0)
    finally:
        sink.stop()
    rows = json.loads(cli(cfg, "messages", "list", "--json").stdout)
    types = [e["type"] for e in rows[0]["events"]]
    assert types == ["queued", "deferred", "sent"]
    assert rows[0]["events"][1]["details"]["reply"].startswith("451 4.3.0")


async def test_permanent_failure_sends_one_dsn(tmp_path: Path) -> None:
    sink = Sink(replies=["550 5.1.1 No such user here"]).start()
    try:
        cfg = write_config(tmp_path, upstream_port=sink.port)
        async with running_app(cfg) as app:
            assert app.submission is not None
            await send(app.submission.port)
            await wait_until(lambda: len(sink.received) == 1, timeout=15,
                             what="the DSN at the upstream")
            await wait_until(lambda: app.scheduler is not None and app.scheduler.busy == 0)
            mail_from, rcpts, data = sink.received[0]
            assert mail_from in ("", "<>") and rcpts == [USER]  # the null sender
            dsn = email.message_from_bytes(data)
            assert dsn.get_content_type() == "multipart/report"
            assert dsn.get_param("report-type") == "delivery-status"
            status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
            assert status, "no message/delivery-status part"
            text = data.decode(errors="replace")
            assert "Final-Recipient: rfc822; bob@example.net" in text
            assert "Status: 5.1.1" in text and "550 5.1.1 No such user here" in text
            assert app.spool.list_ids("incoming") == [] and app.spool.list_ids("deferred") == []
    finally:
        sink.stop()
    rows = json.loads(cli(cfg, "messages", "list", "--json").stdout)
    assert [e["type"] for e in rows[0]["events"]] == ["queued", "bounced"]


async def test_bounce_of_a_bounce_is_dropped(tmp_path: Path) -> None:
    """A DSN that itself fails permanently produces no further DSN."""
    sink = Sink(rcpt_reply="550 5.1.1 Nobody").start()
    try:
        cfg = write_config(tmp_path, upstream_port=sink.port)
        async with running_app(cfg) as app:
            assert app.submission is not None and app.scheduler is not None
            await send(app.submission.port)
            await wait_until(lambda: app.scheduler is not None and app.scheduler.stats.bounced == 2,
                             timeout=15, what="message and its DSN both bounced")
            await wait_until(lambda: app.scheduler is not None and app.scheduler.busy == 0)
            assert app.scheduler.stats.dsns == 1
            assert app.spool.list_ids("incoming") == [] and app.spool.list_ids("deferred") == []
    finally:
        sink.stop()


async def test_unauthenticated_and_relay_tricks(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"trusted_networks": ["127.0.0.2/32"]}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def probe() -> list[tuple[int, bytes]]:
            out = []
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo("x")
                out.append(c.mail("spammer@evil.example"))
            # from the trusted network relaying is allowed, tricks are not
            with smtplib.SMTP("127.0.0.1", port, timeout=10,
                              source_address=("127.0.0.2", 0)) as c:
                c.ehlo("app.example")
                assert c.mail("app@example.com")[0] == 250
                for rcpt in ["victim%evil.example@example.com", "evil.example!victim@example.com",
                             "@example.com:victim@evil.example", '"victim@evil"@example.com',
                             "victim@[192.0.2.1]"]:
                    out.append(c.rcpt(rcpt))
                c.rset()
                c.sendmail("app@example.com", ["bob@example.net"], MESSAGE)
            return out

        replies = await asyncio.to_thread(probe)
        assert replies[0][0] == 530 and replies[0][1].startswith(b"5.7.0")
        for code, text in replies[1:]:
            # refused by our relay check (554 5.7.1), or already by the address parser
            assert (code, text[:5]) in ((554, b"5.7.1"), (553, b"5.1.3")), (code, text)
        # the trusted network relayed a plain message without AUTH
        await wait_until(lambda: len(sink.received) == 1)


async def test_auth_failures_are_rate_limited(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"auth_failures": 3}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def attempts() -> list[int]:
            codes = []
            for _ in range(4):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                    c.ehlo("x")
                    blob = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
                    code, _ = c.docmd("AUTH", f"PLAIN {blob}")
                    codes.append(code)
            return codes

        assert await asyncio.to_thread(attempts) == [535, 535, 535, 421]


async def test_limits(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"max_message_size": 20000, "max_recipients": 2}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def go() -> dict[str, object]:
            res: dict[str, object] = {}
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo("x")
                assert "size" in c.esmtp_features and c.esmtp_features["size"] == "20000"
                assert "enhancedstatuscodes" in c.esmtp_features
                c.login(USER, PASSWORD)
                c.mail(USER)
                res["rcpts"] = [c.rcpt(f"r{i}@example.net")[0] for i in range(3)]
                c.rset()
                big = MESSAGE + (b"x" * 70 + b"\r\n") * 430
                try:  # SIZE= refused at MAIL; without SIZE= the DATA is refused
                    c.sendmail(USER, ["bob@example.net"], big)
                except smtplib.SMTPSenderRefused as exc:
                    res["big"] = (exc.smtp_code, exc.smtp_error[:5])
                c.mail(USER)
                c.rcpt("bob@example.net")
                res["big_data"] = c.data(big)[0]
                long_line = MESSAGE + b"y" * 1200 + b"\r\n"
                try:
                    c.sendmail(USER, ["bob@example.net"], long_line)
                except smtplib.SMTPDataError as exc:
                    res["long"] = (exc.smtp_code, exc.smtp_error[:5])
            return res

        res = await asyncio.to_thread(go)
        assert res["rcpts"] == [250, 250, 452]
        assert res["big"] == (552, b"5.3.4") and res["big_data"] == 552
        assert res["long"] == (500, b"5.5.6")
        assert sink.received == []


SMUGGLE_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\n.\r"]


@pytest.mark.parametrize("ending", SMUGGLE_ENDINGS)
async def test_smtp_smuggling_is_impossible(tmp_path: Path, sink: Sink, ending: bytes) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port)
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port
        auth = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        smuggled = (b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nsmuggled\r\n")
        payload = (b"From: alice@example.com\r\nSubject: legit\r\n\r\nlegit" + ending
                   + smuggled + b"\r\n.\r\n")

        def go() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                f = s.makefile("rb")

                def cmd(line: bytes) -> bytes:
                    s.sendall(line)
                    reply = f.readline()
                    while reply[3:4] == b"-":
                        reply = f.readline()
                    return reply
                f.readline()
                cmd(b"EHLO x\r\n")
                assert cmd(b"AUTH PLAIN " + auth + b"\r\n").startswith(b"235")
                assert cmd(b"MAIL FROM:<alice@example.com>\r\n").startswith(b"250")
                assert cmd(b"RCPT TO:<bob@example.net>\r\n").startswith(b"250")
                assert cmd(b"DATA\r\n").startswith(b"354")
                final = cmd(payload)
                extra = cmd(b"NOOP\r\n")  # anything pending in the pipe shows up here
                cmd(b"QUIT\r\n")
                return final + extra

        replies = await asyncio.to_thread(go)
        assert replies.startswith(b"550 5.5.2"), replies
        assert replies.count(b"\r\n") == 2 and b"250 2.0.0 " in replies  # NOOP
        # refused before queueing: nothing was accepted, so nothing can reach the sink
        assert app.relay is not None and app.relay.accepted == 0
        assert sink.received == []


async def test_swaks_starttls_auth_login(tmp_path: Path, sink: Sink) -> None:
    swaks = require_tool("swaks")
    from tests.support.tlscert import make_cert  # self-signed for 127.0.0.1

    files = make_cert(tmp_path)
    cert, key = files.cert_file, files.key_file
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"host": "127.0.0.1", "tls": "starttls",
                                                 "cert_file": str(cert), "key_file": str(key)}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def run(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [swaks, "--server", "127.0.0.1", "--port", str(port), "--from", USER,
                 "--to", "bob@example.net", "--auth", "LOGIN", "--auth-user", USER,
                 "--auth-password", PASSWORD, "--header", "Subject: via swaks", *extra],
                capture_output=True, text=True, timeout=60)

        plain = await asyncio.to_thread(run)          # no STARTTLS: no AUTH offered
        assert plain.returncode != 0
        assert "did not advertise authentication" in plain.stderr, plain.stdout
        tls = await asyncio.to_thread(run, "--tls")
        assert tls.returncode == 0, tls.stdout + tls.stderr
        assert "250 2.0.0 Ok: queued as" in tls.stdout
        await wait_until(lambda: len(sink.received) == 1)
        assert b"Subject: via swaks" in sink.received[0][2]
        assert b"with ESMTPSA id" in sink.received[0][2]


async def test_spool_unwritable_gives_451(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port)
    async with running_app(cfg) as app:
        assert app.submission is not None
        tmp = app.spool.tmp
        tmp.rmdir()
        tmp.write_text("not a directory")  # every spool write now fails, even as root
        try:
            with pytest.raises(smtplib.SMTPDataError) as ei:
                await send(app.submission.port)
            error = ei.value.smtp_error
            assert ei.value.smtp_code == 451 and isinstance(error, bytes) and error.startswith(b"4.3.0")
        finally:
            tmp.unlink()
            tmp.mkdir()
        await send(app.submission.port)
        await wait_until(lambda: len(sink.received) == 1)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_starttls_listener_offers_auth_only_after_tls(tmp_path: Path, sink: Sink,
                                                            host: str) -> None:
    """With `tls: starttls`, EHLO before STARTTLS lists no AUTH and AUTH gets `538 5.7.11`
    (or 530 while STARTTLS is required), on loopback as elsewhere; after STARTTLS (a real
    handshake, self-signed certificate) AUTH is listed and works."""
    import ssl

    from tests.support.tlscert import make_cert

    files = make_cert(tmp_path)
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"host": host, "tls": "starttls",
                                                 "cert_file": str(files.cert_file),
                                                 "key_file": str(files.key_file)}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def session() -> tuple[bool, tuple[int, bytes], bool, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.ehlo("client.test")
                before = c.has_extn("auth")
                token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
                refused = c.docmd("AUTH", f"PLAIN {token}")
                ctx = ssl.create_default_context(cafile=str(files.cert_file))
                ctx.check_hostname = False
                c.starttls(context=ctx)
                c.ehlo("client.test")
                after = c.has_extn("auth")
                accepted = c.docmd("AUTH", f"PLAIN {token}")
                return before, refused, after, accepted

        before, refused, after, accepted = await asyncio.to_thread(session)
    assert not before
    assert refused[0] in (538, 530), refused
    assert refused[1].startswith((b"5.7.11", b"5.7.0")), refused
    assert after and accepted[0] == 235, accepted


async def test_implicit_tls_listener_takes_auth_off_loopback(tmp_path: Path, sink: Sink) -> None:
    """aiosmtpd's auth_require_tls looks at STARTTLS only: on an implicit-TLS listener
    bound beyond loopback it must be off, or AUTH would be refused inside TLS."""
    import ssl

    from tests.support.tlscert import make_cert

    files = make_cert(tmp_path)
    cfg = write_config(tmp_path, upstream_port=sink.port,
                       listeners={"submission": {"host": "0.0.0.0", "tls": "implicit",
                                                 "cert_file": str(files.cert_file),
                                                 "key_file": str(files.key_file)}})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port = app.submission.port

        def session() -> tuple[bool, tuple[int, bytes]]:
            ctx = ssl.create_default_context(cafile=str(files.cert_file))
            ctx.check_hostname = False
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=ctx) as c:
                c.ehlo("client.test")
                token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
                return c.has_extn("auth"), c.docmd("AUTH", f"PLAIN {token}")

        listed, reply = await asyncio.to_thread(session)
    assert listed and reply[0] == 235, reply
