"""`mailgw companies list|show` as a user runs them (in this process, `companies list` once
as the real subprocess; see test_cli_crm), and the company and raw lines of
`mailgw messages show`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.crm.contacts import set_company_owner
from gateway.crm.store import Store
from gateway.records import NewMessage, SourceRef
from tests.integration.test_cli_crm import cfg, mailgw, mailgw_subprocess

pytestmark = pytest.mark.integration
__all__ = ["cfg"]   # the fixture, shared with test_cli_crm


def test_companies_list_show_and_message_lines(cfg: Path, tmp_path: Path) -> None:
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("email,first_name,company\ncarol@acme.test,Carol,Acme\n"
                        "dave@acme.test,Dave,Acme\nerin@beta.test,Erin,Beta Corp\n")
    assert mailgw(cfg, "contacts", "import", str(contacts)).returncode == 0
    raw = b"From: carol@acme.test\r\nTo: rep@example.test\r\nSubject: Hello\r\n\r\nhi\r\n"

    async def seed() -> int:
        store = await Store.from_config(load_config(cfg))
        try:
            assert await set_company_owner(store, "acme.test", "rep@example.test") is not None
            at = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
            [s] = await store.store_messages([NewMessage(
                message_id="<m1@acme.test>", from_addr="carol@acme.test",
                to_addrs=["rep@example.test"], cc_addrs=[], subject="Hello", date=at,
                direction="inbound", raw=raw, size=len(raw),
                sources=[SourceRef("ingest", "I1", at)])])
            return s.id
        finally:
            await store.close()

    mid = asyncio.run(seed())
    r = mailgw_subprocess(cfg, "companies", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["acme.test", "Acme", "rep@example.test"]
    assert "2 contact(s)" in lines[0]
    assert "1 message(s)" in lines[0] and "last 2026-11-02 09:30 UTC" in lines[0]
    assert lines[1].split()[:4] == ["beta.test", "Beta", "Corp", "-"] and "last -" in lines[1]
    assert lines[-1] == "-- 2 companies"
    r = mailgw(cfg, "companies", "list", "--search", "beta", "--json")
    assert [(c["domain"], c["owner"]) for c in json.loads(r.stdout)] == [("beta.test", None)]
    r = mailgw(cfg, "companies", "show", "ACME.test")
    assert r.returncode == 0, r.stderr
    assert "domain: acme.test\nname: Acme\nowner: rep@example.test\ncontacts: 2\nmessages: 1" \
        in r.stdout
    assert "contact: carol@acme.test Carol" in r.stdout
    shown = json.loads(mailgw(cfg, "companies", "show", "acme.test", "--json").stdout)
    assert [c["email"] for c in shown["contacts"]] == ["carol@acme.test", "dave@acme.test"]
    assert (shown["owner"], shown["name"], shown["contact_count"], shown["message_count"]) == (
        "rep@example.test", "Acme", 2, 1)
    assert "owner: -\n" in mailgw(cfg, "companies", "show", "beta.test").stdout
    r = mailgw(cfg, "companies", "show", "nobody.test")
    assert r.returncode == 1 and r.stderr.strip() == "mailgw: no company nobody.test"
    r = mailgw(cfg, "companies", "show", "not a domain")
    assert r.returncode == 2 and "is not a domain" in r.stderr
    r = mailgw(cfg, "companies", "list", "--limit", "0")
    assert r.returncode == 2 and "--limit" in r.stderr
    r = mailgw(cfg, "messages", "show", str(mid))
    assert "company: acme.test Acme" in r.stdout
    assert f"raw: {len(raw)} bytes kept, sha256 " in r.stdout
