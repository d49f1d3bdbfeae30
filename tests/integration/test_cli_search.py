"""`mailgw messages search QUERY` as a user runs it (in this process, the first search as the
real subprocess; see test_cli_crm): hits printed like
`messages list`, the filters, --json, and a query with nothing to search for exits 2."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.crm.store import Store
from tests.integration.test_cli_crm import cfg, mailgw, mailgw_subprocess
from tests.unit.test_search import inbound

pytestmark = pytest.mark.integration
__all__ = ["cfg"]   # the fixture, shared with test_cli_crm


def test_messages_search(cfg: Path) -> None:
    async def seed() -> None:
        store = await Store.from_config(load_config(cfg))
        at = datetime(2026, 11, 2, tzinfo=UTC)
        try:
            await store.store_messages([
                inbound(1, subject="Pricing for 2027", body="our prices", at=at),
                inbound(2, subject="Price list", frm="dan@beta.test", at=at + timedelta(hours=1)),
                inbound(3, subject="Lunch", at=at + timedelta(hours=2))])
        finally:
            await store.close()

    asyncio.run(seed())
    r = mailgw_subprocess(cfg, "messages", "search", "price")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Price list" in lines[0] and "Pricing for 2027" in lines[1]
    assert lines[-1] == "-- 2 message(s)"
    r = mailgw(cfg, "messages", "search", "price", "--contact", "carol@acme.test", "--json")
    assert [m["subject"] for m in json.loads(r.stdout)] == ["Pricing for 2027"]
    r = mailgw(cfg, "messages", "search", '"list price"', "--json")
    assert json.loads(r.stdout) == []
    r = mailgw(cfg, "messages", "search", "beta.test", "--limit", "5", "--json")
    assert [m["subject"] for m in json.loads(r.stdout)] == ["Price list"]
    r = mailgw(cfg, "messages", "search", "-- &&")
    assert r.returncode == 2 and "QUERY: no word to search for" in r.stderr
