"""The CRM's view over real HTTP, on SQLite and PostgreSQL: a message's original bytes and its
attachments (store.raw disk, database and none), companies (list, one, timeline) and the
``companies`` and ``raw`` fields of the message JSON; every JSON body checked against the
OpenAPI document. Byte identity with what was relayed or fetched end to end is in
``test_originals_e2e.py``."""

from __future__ import annotations

import email
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest

from gateway.api.http import AdminAPI
from gateway.crm.blobs import RawStore
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.mail.parse import parse_message
from gateway.metrics import Metrics
from gateway.records import NewMessage, SourceRef
from tests.integration.test_api import T0, TOKEN, Client, cfg, check, relay

pytestmark = pytest.mark.integration
MAIL = Path(__file__).parent.parent / "data" / "mail"
RULES = LinkRules(own_addresses=frozenset({"alice@example.com"}),
                  own_domains=frozenset({"example.com"}))


@pytest.fixture(params=["disk", "database"])
def raw_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def api(store: Store, raw_mode: str, tmp_path: Path) -> AsyncIterator[Client]:
    store.raw = RawStore(tmp_path / "raw" if raw_mode == "disk" else None,
                         raw_mode == "database")
    store.configure(RULES)
    config = cfg(state_dir=str(tmp_path / "state"))
    a = AdminAPI(store, get_config=lambda: config, metrics=Metrics(), token=TOKEN)
    await a.start("127.0.0.1", 0, loopback_only=True)
    async with aiohttp.ClientSession() as session:
        yield Client(session, f"http://127.0.0.1:{a.port}")
    await a.stop()


async def get_bytes(c: Client, path: str) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with c.session.get(c.base + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.read(), r


def imap(raw: bytes, uid: int, *, at: Any = T0) -> NewMessage:
    p = parse_message(raw)
    return NewMessage.from_parsed(p, raw, direction="inbound", account="alice", sources=[
        SourceRef("imap", f"alice/INBOX/1/{uid}", at, account="alice", folder="INBOX",
                  uidvalidity=1, uid=uid)])


def leaves(raw: bytes) -> list[Message]:
    """The stdlib's view of the parts an attachment list names (leaves that are not body text)."""
    return [p for p in email.message_from_bytes(raw).walk()
            if not p.is_multipart() and (p.get_filename() or p.get_content_maintype()
                                         not in ("text",))]


async def test_raw_and_attachments_are_the_bytes_stored(api: Client, store: Store) -> None:
    raw = (MAIL / "mixed_alternative_qp_base64.eml").read_bytes()
    [stored] = await store.store_messages([imap(raw, 1)])
    status, body, _ = await api.get(f"/api/v1/messages/{stored.id}")
    assert status == 200, body
    check(body, "MessageDetail")
    digest = hashlib.sha256(raw).hexdigest()
    assert body["raw"] == {"kept": True, "size": len(raw), "sha256": digest,
                           "url": f"/api/v1/messages/{stored.id}/raw", "reason": None}
    status, data, resp = await get_bytes(api, body["raw"]["url"])
    assert status == 200 and data == raw
    assert resp.headers["Content-Type"] == "message/rfc822"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="message-{stored.id}.eml"'
    [pdf] = body["attachments"]
    assert pdf["url"] == f"/api/v1/messages/{stored.id}/attachments/0"
    status, data, resp = await get_bytes(api, pdf["url"])
    assert status == 200
    want = next(p for p in leaves(raw) if p.get_content_type() == "application/pdf"
                ).get_payload(decode=True)
    assert data == want and hashlib.sha256(data).hexdigest() == pdf["sha256"]
    assert len(data) == pdf["size"]
    assert resp.headers["Content-Type"] == "application/pdf"
    cd = resp.headers["Content-Disposition"]
    assert cd == ("attachment; filename=\"Angebot M_ller 2026.pdf\"; "
                  "filename*=UTF-8''Angebot%20M%C3%BCller%202026.pdf")
    assert unquote(cd.split("''", 1)[1]) == "Angebot Müller 2026.pdf"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # the same by queue id is for relay/ingest copies; an IMAP message has none
    status, err, _ = await api.get("/api/v1/messages/NOPE/raw")
    assert status == 404 and err["error"] == "no message NOPE"


async def test_every_attachment_kind_decoded(api: Client, store: Store) -> None:
    raw = (MAIL / "attachments_inline_rfc822.eml").read_bytes()
    [stored] = await store.store_messages([imap(raw, 2)])
    _, body, _ = await api.get(f"/api/v1/messages/{stored.id}")
    listed = body["attachments"]
    assert [a["content_type"] for a in listed] == ["image/png", "message/rfc822", "text/calendar"]
    for n, a in enumerate(listed):
        status, data, resp = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/{n}")
        assert status == 200, data
        assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["size"]
        assert resp.headers["Content-Type"].split(";")[0] == a["content_type"]
    png = next(p for p in leaves(raw) if p.get_content_type() == "image/png")
    _, data, resp = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/0")
    assert data == png.get_payload(decode=True)
    assert resp.headers["Content-Disposition"] == 'attachment; filename="chart.png"'
    # the attached message is its exact bytes, as cut out of the raw message
    _, data, _ = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/1")
    assert data in raw and parse_message(data).subject
    _, data, resp = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/2")
    assert resp.headers["Content-Type"] == "text/calendar; charset=utf-8"
    # out of the list, not a number, negative
    status, err, _ = await api.get(f"/api/v1/messages/{stored.id}/attachments/3")
    assert status == 404 and "has no attachment 3 (3 listed" in err["error"]
    for bad in ("x", "-1", "1.0", "٣", "9" * 30):
        status, err, _ = await api.get(f"/api/v1/messages/{stored.id}/attachments/{bad}")
        assert status == 400 and err["parameter"] == "n", (bad, err)


async def test_hostile_names_and_types_cannot_inject_headers(api: Client, store: Store) -> None:
    raw = (b"From: carol@acme.test\r\nTo: alice@example.com\r\nSubject: evil\r\n"
           b"Message-ID: <evil@acme.test>\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
           b'--b\r\nContent-Type: text/html"; x=y; charset="utf-8\r\n evil"\r\n'
           b'Content-Disposition: attachment; filename="a\\"b;c=d%0d%0aX-Evil: 1.html"\r\n\r\n'
           b"<script>alert(1)</script>\r\n"
           b"--b\r\nContent-Type: application/x-thing; name==?utf-8?q?=0D=0AX-Evil:_2?=\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''%0D%0AX-Evil%3A%203.bin\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b--\r\n")
    [stored] = await store.store_messages([imap(raw, 3)])
    _, body, _ = await api.get(f"/api/v1/messages/{stored.id}")
    assert len(body["attachments"]) == 2
    for n in range(2):
        status, data, resp = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/{n}")
        assert status == 200
        assert "X-Evil" not in resp.headers
        for name, value in resp.headers.items():
            assert "\r" not in value and "\n" not in value, (name, value)
        ctype = resp.headers["Content-Type"]
        assert ctype.count(";") <= 1 and '"' not in ctype, ctype
        cd = resp.headers["Content-Disposition"]
        fallback = cd.split('filename="', 1)[1].split('"', 1)[0]
        assert not set(fallback) & set('"\\;%\r\n'), cd
        assert resp.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    _, data, _ = await get_bytes(api, f"/api/v1/messages/{stored.id}/attachments/1")
    assert data == b"\x00\x01\x02"


async def test_raw_by_queue_id_and_missing_file(api: Client, store: Store, raw_mode: str) -> None:
    raw = b"From: alice@example.com\r\nTo: bob@acme.test\r\nSubject: q\r\n\r\nhello\r\n"
    await store.record([relay("QRAW1", raw=raw)], [])
    status, data, _ = await get_bytes(api, "/api/v1/messages/QRAW1/raw")
    assert status == 200 and data == raw
    if raw_mode == "disk":
        store.raw.path(hashlib.sha256(raw).hexdigest()).unlink()
        status, err, _ = await api.get("/api/v1/messages/QRAW1/raw")
        assert status == 404 and "not in the raw store" in err["error"]


async def test_not_kept_with_store_raw_none(api: Client, store: Store) -> None:
    store.raw = RawStore(None, False)       # store.raw: none
    raw = (MAIL / "mixed_alternative_qp_base64.eml").read_bytes()
    [stored] = await store.store_messages([imap(raw, 4)])
    status, body, _ = await api.get(f"/api/v1/messages/{stored.id}")
    check(body, "MessageDetail")
    assert body["raw"]["kept"] is False and "store.raw" in body["raw"]["reason"]
    assert body["raw"]["url"] is None and body["attachments"][0]["url"] is None
    status, page, _ = await api.get("/api/v1/messages")
    check(page, "MessagePage")
    assert page["messages"][0]["raw"]["kept"] is False
    for path in (f"/api/v1/messages/{stored.id}/raw", f"/api/v1/messages/{stored.id}/attachments/0"):
        status, err, _ = await api.get(path)
        assert status == 404 and "store.raw was none" in err["error"], err


async def test_companies_list_one_timeline_and_message_json(api: Client, store: Store) -> None:
    await upsert_contacts(store, [
        ContactInput("carol@acme.test", first_name="Carol", company="Acme",
                     company_owner="rep@example.com"),
        ContactInput("dave@acme.test", company="Acme"),
        ContactInput("erin@beta.test", company="Beta Corp"),
        ContactInput("frank@gamma.test", company="Gamma")])
    msgs = [imap(b"From: carol@acme.test\r\nTo: alice@example.com\r\nSubject: a%d\r\n"
                 b"Message-ID: <co%d@acme.test>\r\n\r\nhi\r\n" % (i, i), 10 + i,
                 at=T0 + timedelta(hours=i)) for i in range(3)]
    msgs.append(imap(b"From: erin@beta.test\r\nTo: alice@example.com\r\nCc: dave@acme.test\r\n"
                     b"Subject: both\r\nMessage-ID: <both@beta.test>\r\n\r\nhi\r\n", 20,
                     at=T0 + timedelta(hours=5)))
    stored = await store.store_messages(msgs)

    status, body, _ = await api.get("/api/v1/companies")
    assert status == 200, body
    check(body, "CompanyList")
    by = {c["domain"]: c for c in body["companies"]}
    assert [c["domain"] for c in body["companies"]] == ["acme.test", "beta.test", "gamma.test"]
    assert (by["acme.test"]["name"], by["acme.test"]["contact_count"],
            by["acme.test"]["message_count"]) == ("Acme", 2, 4)
    assert by["acme.test"]["last_activity"] == (T0 + timedelta(hours=5)).isoformat()
    assert {d: c["owner"] for d, c in by.items()} == {
        "acme.test": "rep@example.com", "beta.test": None, "gamma.test": None}
    assert (by["gamma.test"]["message_count"], by["gamma.test"]["last_activity"]) == (0, None)
    # search and paging by domain
    _, body, _ = await api.get("/api/v1/companies", search="CORP")
    assert [c["domain"] for c in body["companies"]] == ["beta.test"]
    _, p1, r1 = await api.get("/api/v1/companies", limit=2)
    assert [c["domain"] for c in p1["companies"]] == ["acme.test", "beta.test"]
    assert p1["next_cursor"] == "beta.test" and 'rel="next"' in r1.headers["Link"]
    _, p2, _ = await api.get("/api/v1/companies", limit=2, cursor=p1["next_cursor"])
    assert [c["domain"] for c in p2["companies"]] == ["gamma.test"] and p2["next_cursor"] is None

    status, one, _ = await api.get("/api/v1/companies/ACME.test")
    assert status == 200
    check(one, "CompanyDetail")
    assert [c["email"] for c in one["contacts"]] == ["carol@acme.test", "dave@acme.test"]
    assert one["contacts"][0]["name"] == "Carol" and one["message_count"] == 4
    assert one["owner"] == "rep@example.com"
    assert one["contacts"][0]["company_owner"] == "rep@example.com"

    status, t1, _r = await api.get("/api/v1/companies/acme.test/timeline", limit=3)
    assert status == 200
    check(t1, "CompanyTimeline")
    assert t1["company"]["domain"] == "acme.test" and "contacts" not in t1["company"]
    assert t1["company"]["owner"] == "rep@example.com"
    assert [m["subject"] for m in t1["messages"]] == ["both", "a2", "a1"]
    _, t2, _ = await api.get("/api/v1/companies/acme.test/timeline", limit=3,
                             cursor=t1["next_cursor"])
    assert [m["subject"] for m in t2["messages"]] == ["a0"] and t2["next_cursor"] is None

    # the message JSON: list and detail
    _, page, _ = await api.get("/api/v1/messages")
    check(page, "MessagePage")
    both = next(m for m in page["messages"] if m["subject"] == "both")
    assert both["companies"] == [{"domain": "acme.test", "name": "Acme"},
                                 {"domain": "beta.test", "name": "Beta Corp"}]
    _, detail, _ = await api.get(f"/api/v1/messages/{stored[0].id}")
    assert detail["companies"] == [{"domain": "acme.test", "name": "Acme"}]

    for path, status_want in (("/api/v1/companies/unknown.test", 404),
                              ("/api/v1/companies/unknown.test/timeline", 404),
                              ("/api/v1/companies/a%20b", 400), ("/api/v1/companies/x@y.test", 400),
                              ("/api/v1/companies/a..b", 400),
                              ("/api/v1/companies/a..b/timeline", 400)):
        status, err, _ = await api.get(path)
        assert status == status_want, (path, err)
        check(err, "Error")
        if status_want == 400:
            assert err["parameter"] == "domain"
    status, err, _ = await api.get("/api/v1/companies", sort="x")
    assert status == 400 and err["parameter"] == "sort"
