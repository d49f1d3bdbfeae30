"""`mailgw contacts import|list` and `mailgw messages list|show` as a user runs them: most
commands through `gateway.cli.main` in this process (tests/support/cli.py), one of each
family as the real subprocess (entry point, exit code, output through the pipe)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from gateway.crm.store import Store
from gateway.records import NewMessage, SourceRef
from tests.support.cli import mailgw_in_process, mailgw_process

pytestmark = pytest.mark.integration


def mailgw(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailgw ARGS -c CFG` in this process."""
    return mailgw_in_process([*args, "-c", str(cfg)])


def mailgw_subprocess(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS -c CFG`, the real subprocess."""
    return mailgw_process([*args, "-c", str(cfg)])


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "delivery": {"route": "mx"}, "users": [], "crm": {"exclude": ["noreply@*"]}}))
    return path


def test_contacts_import_list_and_linked_messages(cfg: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("email,first_name\ncarol@acme.test,Carol\nnope,X\n")
    r = mailgw_subprocess(cfg, "contacts", "import", str(bad))
    assert r.returncode == 2 and f"{bad}:3: email: 'nope' is not an e-mail address" in r.stderr

    async def seed() -> None:
        store = await Store.from_config(load_config(cfg))
        try:
            at = datetime(2026, 11, 2, tzinfo=UTC)
            await store.store_messages([NewMessage(
                message_id="<m1@acme.test>", from_addr="carol@acme.test",
                to_addrs=["rep@example.test"], cc_addrs=[], subject="Hello", date=at,
                direction="inbound", text_body="hi there", sources=[SourceRef("ingest", "I1", at)])])
        finally:
            await store.close()

    asyncio.run(seed())
    good = tmp_path / "good.csv"
    good.write_text("email,first_name,last_name,company\ncarol@acme.test,Carol,Ng,Acme\n")
    r = mailgw(cfg, "contacts", "import", str(good))
    assert r.returncode == 0, r.stderr
    assert "1 created, 0 updated" in r.stdout and "1 new companies" in r.stdout
    r = mailgw(cfg, "contacts", "import", str(good))
    assert "0 created, 0 updated, 1 unchanged" in r.stdout
    r = mailgw(cfg, "contacts", "list", "--json")
    rows = json.loads(r.stdout)
    assert [(c["email"], c["name"], c["company"]) for c in rows] == [
        ("carol@acme.test", "Carol Ng", "Acme")]
    r = mailgw_subprocess(cfg, "messages", "list", "--contact", "carol@acme.test", "--json")
    msgs = json.loads(r.stdout)
    assert len(msgs) == 1 and msgs[0]["contacts"][0]["email"] == "carol@acme.test"
    r = mailgw(cfg, "messages", "show", str(msgs[0]["id"]), "--json")
    shown = json.loads(r.stdout)
    assert shown["text_body"] == "hi there" and shown["sources"] == ["ingest"]
    r = mailgw_subprocess(cfg, "messages", "show", "999")
    assert r.returncode == 1 and "no message 999" in r.stderr


REPR_MARKS = ("{'", "['", "('", "datetime.datetime(", "None", "True", "False", "\\n")


def test_messages_show_is_readable_text_with_the_tracking_summary(cfg: Path) -> None:
    from datetime import timedelta

    from gateway.records import AcceptedMessage, EventRecord

    at = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

    async def seed() -> None:
        store = await Store.from_config(load_config(cfg))
        try:
            await store.record([AcceptedMessage(
                queue_id="S1", message_id="<s1@example.test>", from_addr="rep@example.test",
                from_name="Rep", to_addrs=["bob@acme.test", "carol@acme.test"],
                cc_addrs=["dan@acme.test"], subject="Offer", date=at, snippet="see the offer",
                size=10, recipients=["bob@acme.test", "carol@acme.test"], user="rep@example.test",
                account=None, at=at, template="offer",
                attachments=[{"filename": "offer.pdf", "content_type": "application/pdf",
                              "size": 1234, "sha256": "ab" * 32, "content_id": None,
                              "inline": False}])], [
                EventRecord("S1", "sent", "bob@acme.test", at, {"reply": "250 2.0.0 OK"}),
                EventRecord("S1", "opened", "bob@acme.test", at + timedelta(seconds=1),
                            {"category": "proxy", "user_agent": "Mozilla/5.0"}, machine=True),
                EventRecord("S1", "opened", "bob@acme.test", at + timedelta(hours=1),
                            {"category": "proxied", "user_agent": "GoogleImageProxy"}, machine=True),
                EventRecord("S1", "opened", "bob@acme.test", at + timedelta(hours=2),
                            {"category": "human", "user_agent": "Chrome"}),
                EventRecord("S1", "clicked", "bob@acme.test", at + timedelta(hours=2, minutes=1),
                            {"category": "human", "url": "https://acme.test/offer"}),
                EventRecord("S1", "clicked", "bob@acme.test", at + timedelta(seconds=2),
                            {"category": "scanner", "url": "https://acme.test/offer"}, machine=True)])
        finally:
            await store.close()

    asyncio.run(seed())
    r = mailgw(cfg, "messages", "show", "S1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for mark in REPR_MARKS:
        assert mark not in r.stdout, (mark, r.stdout)
    assert "to: bob@acme.test, carol@acme.test" in lines and "cc: dan@acme.test" in lines
    assert "date: 2026-12-01 10:00 UTC" in lines and "sources: relay" in lines
    assert "account: -" in lines and "references: -" in lines and "from_name: Rep" in lines
    assert "attachment: offer.pdf (application/pdf, 1234 bytes)" in lines
    assert ("tracking: Opened 3 times (1 unique, 1 human, 1 proxied, 1 machine: proxy 1) · "
            "Clicked 2 times (1 human, 1 machine: scanner 1) · first 2026-12-01 11:00 UTC, "
            "last 2026-12-01 12:01 UTC · 1 of 2 recipient(s) opened") in lines
    assert "  link https://acme.test/offer: 2 clicks (1 human)" in lines
    assert ("  bob@acme.test: opened · Opened 3 times (1 unique, 1 human, 1 proxied, 1 machine: "
            "proxy 1) · Clicked 2 times (1 human, 1 machine: scanner 1) · first 2026-12-01 11:00 "
            "UTC, last 2026-12-01 12:01 UTC") in lines
    assert ("  carol@acme.test: not opened · Opened 0 times (0 unique, 0 human, 0 proxied, "
            "0 machine) · Clicked 0 times (0 human, 0 machine) · no activity by a person") in lines
    assert "  2026-12-01 10:00:00 UTC  sent         bob@acme.test  250 2.0.0 OK" in lines
    assert ("  2026-12-01 12:01:00 UTC  clicked      bob@acme.test  human https://acme.test/offer"
            in lines)
    assert any(ln.startswith("seen: source=relay ref=S1") for ln in lines)


def test_contacts_ambiguous_lists_names_link_by_name_left_unlinked(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "delivery": {"route": "mx"}, "users": [], "crm": {"link_by": ["address", "name"]}}))
    people = tmp_path / "people.csv"
    people.write_text("email,name\njohn@a.test,John Doe\njd@b.test,John Doe\n"
                      "carol@acme.test,Carol Smith\n")
    assert mailgw(cfg, "contacts", "import", str(people)).returncode == 0

    async def seed() -> None:
        store = await Store.from_config(load_config(cfg))
        try:
            at = datetime(2026, 11, 2, tzinfo=UTC)
            await store.store_messages([NewMessage(
                message_id=f"<n{i}@gmail.com>", from_addr=addr, from_name=name,
                to_addrs=["rep@example.test"], cc_addrs=[], subject="Hello", date=at,
                direction="inbound", sources=[SourceRef("ingest", f"I{i}", at)])
                for i, (addr, name) in enumerate([("john.doe@gmail.com", "John Doe"),
                                                  ("carol.p@gmail.com", "Smith, Carol")])])
        finally:
            await store.close()

    asyncio.run(seed())
    r = mailgw(cfg, "contacts", "ambiguous")
    assert r.returncode == 0, r.stderr
    assert "john.doe@gmail.com" in r.stdout and "jd@b.test, john@a.test" in r.stdout
    assert "1 ambiguous address(es)" in r.stdout and "carol" not in r.stdout
    r = mailgw(cfg, "contacts", "ambiguous", "--json")
    assert [x["address"] for x in json.loads(r.stdout)] == ["john.doe@gmail.com"]
    r = mailgw(cfg, "contacts", "list", "--json")
    carol = next(x for x in json.loads(r.stdout) if x["email"] == "carol@acme.test")
    assert carol["emails"] == ["carol@acme.test", "carol.p@gmail.com"]
