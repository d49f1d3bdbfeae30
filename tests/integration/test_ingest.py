"""The ingest listener end to end over SMTP, with real DKIM/SPF lookups against a loopback DNS server.

A BCC from a user is stored; a spoof is refused with 550 5.7.1; forwards in the Gmail,
Outlook and Apple Mail inline styles (and as an attachment) are stored as the original
message; the same message on the relay and ingest paths is one row; the store being
down or DNS failing is a 451, never a 250. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.crm.engine import make_engine
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.keys import dkim as dkimkeys
from gateway.pipeline.dkim import Signer, SigningKey
from tests.conftest import free_port
from tests.integration.harness import running_app, write_config
from tests.support.dns import DNSServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data" / "mail"
CRM = "crm@gw.example.com"
REP = "rep@example.com"


@dataclass
class Env:
    app: App
    port: int
    signer: Signer
    dns: DNSServer

    async def send(self, raw: bytes, mail_from: str = REP, rcpt: str = CRM,
                   sign: bool = True) -> tuple[int, bytes]:
        """One SMTP transaction from a thread (the gateway runs in this event loop)."""
        if sign:
            raw = self.signer.sign(raw)
        return await asyncio.to_thread(self._send, raw, mail_from, rcpt)

    def _send(self, raw: bytes, mail_from: str, rcpt: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            s.ehlo("mx.example.com")
            code, msg = s.mail(mail_from)
            if code != 250:
                return code, msg
            code, msg = s.rcpt(rcpt)
            if code != 250:
                return code, msg
            return s.data(raw)

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
async def env(url: str, tmp_path: Path) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    key = dkimkeys.generate("rsa-sha256", 1024)
    signer = Signer({"example.com": [SigningKey("example.com", "s1", "rsa-sha256", key)]})
    record = dkimkeys.dns_record(key)
    zone: dict[str, dict[str, list[Any]]] = {
        "s1._domainkey.example.com": {"TXT": [
            " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))]},
        "example.com": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},       # not our loopback: SPF fails
        "nodns.example": {"A": ["192.0.2.7"]},                       # publishes nothing
    }
    async with DNSServer(zone) as dns, Upstream() as upstream:
        port = free_port()
        cfg = write_config(
            tmp_path, upstream_port=upstream.port,
            store={"url": url},
            listeners={"ingest": {"host": "127.0.0.1", "port": port}},
            ingest={"addresses": [CRM]},
            users=[{"login": REP, "password_hash": _hash(), "name": "Rep"},
                   {"login": "ops@nodns.example", "password_hash": _hash()}],
            delivery={"nameservers": [f"127.0.0.1:{dns.port}"]},
            crm={"exclude": ["noreply@*"]})
        async with running_app(cfg) as app:
            yield Env(app, port, signer, dns)


def _hash() -> str:
    from tests.integration.harness import password_hash

    return password_hash()


async def test_bcc_from_a_user_is_stored_with_its_source(env: Env) -> None:
    code, reply = await env.send(fixture("bcc_plain.eml"))
    assert code == 250 and b"logged as" in reply
    rows = await env.store.list_messages()
    assert len(rows) == 1
    m = rows[0]
    assert m["sources"] == ["ingest"] and m["direction"] == "outbound"
    assert m["from"] == REP and m["user"] == REP


async def test_spoofs_and_strangers_are_refused(env: Env) -> None:
    raw = fixture("bcc_plain.eml")
    code, reply = await env.send(raw, mail_from="mallory@evil.test")      # envelope not ours
    assert (code, reply[:5]) == (550, b"5.7.1")
    unsigned = raw  # From and envelope ours, but no DKIM and SPF fails for 127.0.0.1
    code, reply = await env.send(unsigned, sign=False)
    assert (code, reply[:5]) == (550, b"5.7.1") and b"verification failed" in reply
    code, reply = await env.send(raw, rcpt="someone@gw.example.com")
    assert (code, reply[:5]) == (550, b"5.1.1")
    # a domain that publishes nothing: the address check alone decides
    nodns = raw.replace(b"rep@example.com", b"ops@nodns.example")
    code, _ = await env.send(nodns, mail_from="ops@nodns.example", sign=False)
    assert code == 250
    assert [m["from"] for m in await env.store.list_messages()] == ["ops@nodns.example"]


@pytest.mark.parametrize("name,style", [("gmail_forward_text.eml", "gmail"),
                                        ("outlook_owa_forward_html.eml", "outlook"),
                                        ("apple_forward_text.eml", "apple"),
                                        ("outlook_forward_as_attachment.eml", "attachment")])
async def test_forwards_are_stored_as_the_original(env: Env, name: str, style: str) -> None:
    code, reply = await env.send(fixture(name))
    assert code == 250, reply
    rows = await env.store.list_messages()
    assert len(rows) == 1
    m = rows[0]
    assert m["from"] != REP and m["direction"] == "inbound", (style, m)
    assert not m["subject"].lower().startswith(("fw", "fwd", "wg"))
    full = await env.store.get_message(m["id"], bodies=True)
    assert full is not None and full["text_body"].strip()


async def test_same_message_via_relay_and_ingest_is_one_row(env: Env) -> None:
    raw = fixture("bcc_plain.eml")
    assert env.app.relay is not None
    from gateway.relay import Submission

    await env.app.relay.accept(Submission(mail_from=REP, rcpts=["jane@customer.example"],
                                          data=raw, user=REP))
    assert env.app.writer is not None
    code, _ = await env.send(raw)
    assert code == 250

    async def both() -> bool:
        rows = await env.store.list_messages()
        return len(rows) == 1 and set(rows[0]["sources"]) == {"relay", "ingest"}

    from tests.integration.harness import wait_until

    await wait_until(both, timeout=10, what="one message with relay and ingest sources")


async def test_store_down_or_dns_failing_is_451(env: Env) -> None:
    assert env.app.ingest is not None
    real = env.app.ingest.store
    bad_url = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none"
    env.app.ingest.store = Store(make_engine(bad_url), bad_url)
    env.app.ingest.store.configure(real.rules)
    try:
        code, reply = await env.send(fixture("bcc_plain.eml"))
        assert (code, reply[:5]) == (451, b"4.3.0")
    finally:
        await env.app.ingest.store.close()
        env.app.ingest.store = real
    env.dns.servfail.add("*")
    code, reply = await env.send(fixture("bcc_plain.eml"))
    assert (code, reply[:5]) == (451, b"4.7.0")
    assert await real.list_messages() == []


async def test_excluded_sender_is_accepted_and_dropped(env: Env) -> None:
    raw = fixture("gmail_forward_text.eml").replace(b"jane@customer.example",
                                                    b"noreply@customer.example")
    code, _ = await env.send(raw)
    assert code == 250
    assert await env.store.list_messages() == []


async def test_messages_of_any_size_are_parsed_and_unwrapped_off_the_event_loop(
        store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading

    import dns.resolver

    from gateway import ingest as ingest_mod
    from gateway.config import Config
    from gateway.mail.forward import unwrap_forward
    from gateway.mail.parse import parse_message

    where: list[tuple[str, bool]] = []   # (step, ran on the event loop's thread)
    loop_thread = threading.get_ident()

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any) -> Any:
            where.append((name, threading.get_ident() == loop_thread))
            return real(*args)
        return call

    monkeypatch.setattr(ingest_mod, "parse_message", spy("parse", parse_message))
    monkeypatch.setattr(ingest_mod, "unwrap_forward", spy("unwrap", unwrap_forward))
    cfg = Config.model_validate({"ingest": {"addresses": [CRM]}, "delivery": {"route": "mx"},
                                 "users": [{"login": REP, "password_hash": _hash()}],
                                 "source": str(tmp_path / "gateway.yaml")})
    ingest = ingest_mod.Ingest(lambda: cfg, store, dns.resolver.Resolver(configure=False))
    inner = (b"From: carol@acme.test\r\nTo: rep@example.com\r\nSubject: Specs\r\n"
             b"Message-ID: <specs@acme.test>\r\n\r\n" + b"spec line\r\n" * 40_000)
    outer = (b"From: rep@example.com\r\nTo: crm@gw.example.com\r\nSubject: Fwd: Specs\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
             b"--b\r\nContent-Type: text/plain\r\n\r\nFYI\r\n"
             b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b--\r\n")
    assert len(outer) > ingest_mod.THREAD_PARSE_BYTES
    result = await ingest.accept(ingest_mod.IngestSubmission(REP, outer, trusted=True))
    assert result.forwarded == "attachment" and result.message_pk is not None
    assert where == [("parse", False), ("unwrap", False)]
    small = outer.replace(b"spec line\r\n" * 40_000, b"spec line\r\n")
    where.clear()
    await ingest.accept(ingest_mod.IngestSubmission(REP, small, trusted=True))
    assert where == [("parse", False), ("unwrap", False)]   # small ones too: off the loop
