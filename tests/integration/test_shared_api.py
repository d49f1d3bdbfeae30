"""Shared mailboxes and daily figures through the API over real HTTP and the CLI, every body
checked against the OpenAPI document: `assigned_to` on messages and as a filter, owners on
contacts and companies (unknown logins refused: 400 naming the field, exit 2 naming the
line), `today` on accounts, a runtime account made shared through the API."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from gateway.accounts.service import AccountService
from gateway.api.http import AdminAPI
from gateway.config import Config
from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.metrics import Metrics
from gateway.records import NewMessage, SourceRef
from tests.integration.test_api import TOKEN, Client, check
from tests.support.cli import mailgw_in_process, mailgw_process

pytestmark = pytest.mark.integration
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"


def shared_cfg(tmp_path: Path) -> Config:
    return Config.model_validate({
        "state_dir": str(tmp_path / "state"), "source": str(tmp_path / "gateway.yaml"),
        "users": [{"login": u, "password_hash": HASH} for u in ("alice@ours.test", "Bob@ours.test")],
        "accounts": [{"id": "sales", "email": "sales@ours.test", "shared": True,
                      "imap": {"host": "127.0.0.1", "port": 1}, "sync": {"enabled": False},
                      "assign": {"fallback": "round_robin", "users": ["alice@ours.test"]}}],
        "crm": {"auto_create_contacts": True}})


def inbound(mid: str, frm: str) -> NewMessage:
    now = datetime.now(UTC)
    return NewMessage(message_id=mid, from_addr=frm, to_addrs=["sales@ours.test"], cc_addrs=[],
                      subject="hello", date=now, direction="inbound", account="sales",
                      sources=[SourceRef("imap", f"sales/INBOX/1/{mid}", now, account="sales",
                                         folder="INBOX", uidvalidity=1, uid=1)])


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[tuple[Store, Client]]:
    config = shared_cfg(tmp_path)
    store.configure(LinkRules.from_config(config), ())
    accounts = AccountService(lambda: config, store)
    a = AdminAPI(store, get_config=lambda: accounts.effective(config), metrics=Metrics(),
                 token=TOKEN, accounts=accounts)
    await a.start("127.0.0.1", 0, loopback_only=True)
    async with aiohttp.ClientSession() as session:
        yield store, Client(session, f"http://127.0.0.1:{a.port}")
    await a.stop()
    await accounts.stop()


async def test_owners_assignment_and_figures_through_the_api(api: tuple[Store, Client]) -> None:
    store, c = api
    status, body = await c.send("PUT", "/api/v1/contacts/carol@acme.test",
                                {"company": "Acme", "owner": "bob@ours.test"})
    assert status == 201 and body["owner"] == "Bob@ours.test", body   # spelled as configured
    check(body, "Contact")
    status, body = await c.send("PUT", "/api/v1/contacts/dan@acme.test", {"owner": "zoe@ours.test"})
    assert status == 400 and body["parameter"] == "body.owner"
    status, body = await c.send("POST", "/api/v1/contacts", [
        {"email": "e@beta.test", "company_owner": "nobody@ours.test", "domain": "beta.test"}])
    assert status == 400 and body["parameter"] == "contacts[0].company_owner"
    status, body = await c.send("POST", "/api/v1/contacts", [{"email": "e@gmail.com",
                                                              "company_owner": "alice@ours.test"}])
    assert status == 400 and body["parameter"] == "contacts[0].company_owner"   # no company

    status, body = await c.send("PUT", "/api/v1/companies/beta.test/owner", {"owner": "alice@ours.test"})
    assert status == 404
    await c.send("POST", "/api/v1/contacts", [{"email": "f@beta.test", "domain": "beta.test"}])
    status, body = await c.send("PUT", "/api/v1/companies/BETA.test/owner", {"owner": "BOB@ours.test"})
    assert status == 200 and body == {"domain": "beta.test", "name": "", "owner": "Bob@ours.test"}
    check(body, "CompanyOwner")
    for bad in ({"owner": "zoe@ours.test"}, {"owner": 3}, {}, {"owner": None, "x": 1}):
        status, body = await c.send("PUT", "/api/v1/companies/beta.test/owner", bad)
        assert status == 400, bad

    await store.store_messages([inbound("<a1@t>", "carol@acme.test"),
                                inbound("<a2@t>", "g@beta.test"),
                                inbound("<a3@t>", "h@gamma.test")])
    status, body, _ = await c.get("/api/v1/messages", assigned_to="bob@OURS.test")
    assert status == 200
    check(body, "MessagePage")
    assert sorted((m["message_id"], m["assigned_rule"]) for m in body["messages"]) == [
        ("<a1@t>", "contact_owner"), ("<a2@t>", "company_owner")]
    status, body, _ = await c.get("/api/v1/messages", assigned_to="alice@ours.test")
    assert [(m["message_id"], m["assigned_to"], m["assigned_rule"]) for m in body["messages"]] == [
        ("<a3@t>", "alice@ours.test", "round_robin")]
    status, body, _ = await c.get("/api/v1/messages", assigned_to="zoe@ours.test")
    assert status == 400 and body["parameter"] == "assigned_to"

    status, body, _ = await c.get("/api/v1/accounts")
    check(body, "AccountList")
    [sales] = body["accounts"]
    assert sales["shared"] is True and sales["assign"]["fallback"] == "round_robin"
    assert sales["today"]["synced"] == 3 and sales["today"]["received"] == 3
    assert sales["today"]["linked"] == 3 and sales["today"]["sent"] == 0
    status, body, _ = await c.get("/api/v1/accounts/sales/sync")
    check(body, "SyncStatus")
    assert body["today"] == sales["today"]

    # a runtime account takes the same settings; its users must be known logins
    new = {"id": "support", "email": "support@ours.test", "imap": {"host": "127.0.0.1", "port": 1,
                                                                  "tls": "none"},
           "auth": {"password": "x"}, "shared": True,
           "assign": {"fallback": "round_robin", "users": ["zoe@ours.test"]}}
    status, body = await c.send("POST", "/api/v1/accounts", new)
    assert status == 400 and "assign.users.0" in str(body), body
    new["assign"] = {"fallback": "none"}
    status, body = await c.send("POST", "/api/v1/accounts", new)
    assert status == 201 and body["shared"] is True, body
    status, body = await c.send("PATCH", "/api/v1/accounts/support",
                                {"assign": {"fallback": "round_robin", "users": ["bob@ours.test"]}})
    assert status == 200 and body["assign"] == {"fallback": "round_robin",
                                                "users": ["bob@ours.test"]}, body
    check(body, "Account")


def mailgw(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailgw ARGS -c tmp_path/gateway.yaml` in this process (tests/support/cli.py)."""
    return mailgw_in_process([*args, "-c", str(tmp_path / "gateway.yaml")])


def mailgw_subprocess(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The same as the real subprocess, `python -m gateway` of this tree."""
    return mailgw_process([*args, "-c", str(tmp_path / "gateway.yaml")],
                          env={"PYTHONPATH": str(Path(__file__).parents[2])})


def test_cli_refuses_unknown_owners_and_shows_figures(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x\n")
    (tmp_path / "gateway.yaml").write_text(f"""\
state_dir: ./var
users:
  - login: alice@ours.test
    password_hash: '{HASH}'
accounts:
  - id: sales
    email: sales@ours.test
    imap: {{host: 127.0.0.1, port: 1}}
    auth: {{password_file: pw}}
    sync: {{enabled: false}}
    shared: true
    assign: {{fallback: round_robin, users: [alice@ours.test]}}
""")
    (tmp_path / "c.csv").write_text("email,owner,company_owner,domain\n"
                                    "a@acme.test,alice@ours.test,,\n"
                                    "b@acme.test,zoe@ours.test,,\n"
                                    "c@beta.test,,nobody@ours.test,beta.test\n")
    r = mailgw(tmp_path, "contacts", "import", str(tmp_path / "c.csv"))
    assert r.returncode == 2, r
    assert f"{tmp_path / 'c.csv'}:3: owner: no user with login 'zoe@ours.test'" in r.stderr
    assert f"{tmp_path / 'c.csv'}:4: company_owner: no user with login 'nobody@ours.test'" in r.stderr
    (tmp_path / "c.csv").write_text("email,owner\na@acme.test,ALICE@ours.test\n")
    r = mailgw(tmp_path, "contacts", "import", str(tmp_path / "c.csv"))
    assert r.returncode == 0, r
    r = mailgw(tmp_path, "contacts", "list", "--json")
    assert '"owner": "alice@ours.test"' in r.stdout, r.stdout
    r = mailgw(tmp_path, "messages", "list", "--assigned-to", "zoe@ours.test")
    assert r.returncode == 2 and "--assigned-to" in r.stderr, r
    r = mailgw(tmp_path, "messages", "list", "--assigned-to", "alice@ours.test")
    assert r.returncode == 0 and "-- 0 message(s)" in r.stdout, r
    r = mailgw_subprocess(tmp_path, "accounts", "list")
    assert r.returncode == 0 and "SYNCED" in r.stdout and "RECEIVED" in r.stdout, r
    assert "shared: unowned mail -> round_robin (alice@ours.test)" in r.stdout, r.stdout
    r = mailgw(tmp_path, "sync", "status", "sales")
    assert r.returncode == 0 and "0 synced, 0 linked to contacts, 0 sent, 0 received" in r.stdout, r
