"""`mailgw contacts import|list` and `mailgw messages list|show` as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from gateway.crm.store import Store
from gateway.records import NewMessage, SourceRef

pytestmark = pytest.mark.integration


def mailgw(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


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
    r = mailgw(cfg, "contacts", "import", str(bad))
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
    r = mailgw(cfg, "messages", "list", "--contact", "carol@acme.test", "--json")
    msgs = json.loads(r.stdout)
    assert len(msgs) == 1 and msgs[0]["contacts"][0]["email"] == "carol@acme.test"
    r = mailgw(cfg, "messages", "show", str(msgs[0]["id"]), "--json")
    shown = json.loads(r.stdout)
    assert shown["text_body"] == "hi there" and shown["sources"] == ["ingest"]
    r = mailgw(cfg, "messages", "show", "999")
    assert r.returncode == 1 and "no message 999" in r.stderr
