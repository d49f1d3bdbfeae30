"""The engagement report on SQLite and PostgreSQL: exact counts and rates from seeded events,
machine opens and clicks kept out of the human figures, groupings, the window; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.crm.reports import engagement, format_table
from gateway.crm.store import Store
from gateway.records import AcceptedMessage, EventRecord, NewMessage, SourceRef
from tests.support.cli import mailgw_in_process

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
T = NOW - timedelta(days=2)


def relay(qid: str, to: list[str], *, at: datetime = T, user: str | None = "alice@example.com",
          template: str | None = None) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@example.com>",
                           from_addr="alice@example.com", to_addrs=to, cc_addrs=[],
                           subject=qid, date=at, snippet="", size=1, recipients=to, user=user,
                           account=None, at=at, template=template)


def ev(qid: str, type_: str, rcpt: str, machine: bool = False) -> EventRecord:
    return EventRecord(qid, type_, rcpt, T + timedelta(hours=1), machine=machine)


async def seed(store: Store) -> None:
    await store.record(
        [relay("M1", ["bob@acme.test", "carol@acme.test", "dan@beta.test"], template="promo"),
         relay("M2", ["eve@beta.test", "frank@gamma.test"], user="bo@example.com"),
         relay("OLD", ["old@acme.test"], at=NOW - timedelta(days=40), template="promo")],
        [ev("M1", "sent", "bob@acme.test"), ev("M1", "sent", "carol@acme.test"),
         ev("M1", "sent", "dan@beta.test"),
         ev("M1", "opened", "bob@acme.test"), ev("M1", "opened", "Bob@Acme.test"),  # one person
         ev("M1", "opened", "bob@acme.test", machine=True),
         ev("M1", "opened", "carol@acme.test", machine=True),    # carol: only a proxy opened it
         ev("M1", "clicked", "bob@acme.test"),
         ev("M1", "clicked", "dan@beta.test", machine=True),
         ev("M1", "clicked", "dan@beta.test", machine=True),
         ev("M2", "deferred", "eve@beta.test"), ev("M2", "sent", "eve@beta.test"),
         ev("M2", "bounced", "frank@gamma.test"),
         ev("M2", "replied", "eve@beta.test"),
         ev("OLD", "sent", "old@acme.test"), ev("OLD", "opened", "old@acme.test")])
    # inbound mail is never counted, whatever its events
    await store.store_messages([NewMessage(
        message_id="<in@acme.test>", from_addr="bob@acme.test", to_addrs=["alice@example.com"],
        cc_addrs=[], subject="hi", date=T, direction="inbound",
        sources=[SourceRef("ingest", "ING1", T)])])


def pick(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["group"], row["sent"], row["delivered"], row["bounced"], row["opened"],
            row["clicked"], row["replied"], row["machine_opens"], row["machine_clicks"])


async def test_totals_rates_and_machine_events_kept_out(store: Store) -> None:
    await seed(store)
    r = await engagement(store, days=30, now=NOW)
    assert r["by"] is None and r["days"] == 30
    assert [pick(g) for g in r["groups"]] == [("all", 5, 4, 1, 1, 1, 1, 2, 2)]
    total = r["total"]
    assert pick(total)[1:] == (5, 4, 1, 1, 1, 1, 2, 2)
    assert (total["delivery_rate"], total["bounce_rate"], total["open_rate"],
            total["click_rate"], total["reply_rate"]) == (0.8, 0.2, 0.25, 0.25, 0.25)
    wider = await engagement(store, days=60, now=NOW)        # the 40-day-old message joins
    assert pick(wider["total"])[1:] == (6, 5, 1, 2, 1, 1, 2, 2)


async def test_groupings(store: Store) -> None:
    await seed(store)
    by_template = await engagement(store, days=30, by="template", now=NOW)
    assert [pick(g) for g in by_template["groups"]] == [
        ("promo", 3, 3, 0, 1, 1, 0, 2, 2), ("(none)", 2, 1, 1, 0, 0, 1, 0, 0)]
    promo, none = by_template["groups"]
    assert promo["open_rate"] == round(1 / 3, 4) and none["reply_rate"] == 1.0
    by_user = await engagement(store, days=30, by="user", now=NOW)
    assert [g["group"] for g in by_user["groups"]] == ["alice@example.com", "bo@example.com"]
    by_domain = await engagement(store, days=30, by="domain", now=NOW)
    assert [pick(g) for g in by_domain["groups"]] == [
        ("acme.test", 2, 2, 0, 1, 1, 0, 2, 0), ("beta.test", 2, 2, 0, 0, 0, 1, 0, 2),
        ("gamma.test", 1, 0, 1, 0, 0, 0, 0, 0)]
    gamma = by_domain["groups"][2]
    assert gamma["open_rate"] is None and gamma["bounce_rate"] == 1.0   # nothing delivered
    assert pick(by_domain["total"])[1:] == (5, 4, 1, 1, 1, 1, 2, 2)


async def test_empty_window_and_bad_arguments(store: Store) -> None:
    r = await engagement(store, days=7, by="domain", now=NOW)
    assert r["groups"] == [] and r["total"]["sent"] == 0 and r["total"]["open_rate"] is None
    assert "(no outbound messages in this window)" in format_table(r)
    with pytest.raises(ValueError, match="by must be"):
        await engagement(store, by="color")
    with pytest.raises(ValueError, match="days"):
        await engagement(store, days=0)


async def test_table_is_aligned_with_a_total_line(store: Store) -> None:
    await seed(store)
    table = format_table(await engagement(store, days=30, by="domain", now=NOW))
    lines = table.splitlines()
    assert lines[1].split()[:4] == ["domain", "sent", "deliv", "bounced"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    rows = {ln.split()[0]: ln.split() for ln in lines[3:]}
    assert list(rows) == ["acme.test", "beta.test", "gamma.test", "total"]
    assert rows["gamma.test"][6] == "-" and rows["total"][1:3] == ["5", "4"]
    assert rows["total"][6] == "25.0"                          # open% of delivered
    # the name column left-aligned, numbers right-aligned: every line has the header's width
    assert {len(ln) for ln in lines[1:]} == {len(lines[1])}


def hit(type_: str, rcpt: str, category: str) -> EventRecord:
    return EventRecord("P1", type_, rcpt, T + timedelta(hours=2), machine=category != "human",
                       details={"category": category, "user_agent": "x"})


async def test_open_rate_counts_people(store: Store) -> None:
    rcpts = [f"{n}@people.test" for n in "abcdef"]
    await store.record([relay("P1", rcpts)], [
        *(ev("P1", "sent", r) for r in rcpts),
        hit("opened", "a@people.test", "proxied"),     # Gmail's proxy, on display: a person
        hit("clicked", "b@people.test", "human"),      # images blocked, but clicked: read it
        hit("clicked", "c@people.test", "human"),      # clicked, and a machine loaded the
        hit("opened", "c@people.test", "proxy"),       # pixel: the pixel did load, not opened
        hit("opened", "d@people.test", "prefetch"),    # only a machine
        hit("opened", "e@people.test", "human"),
        hit("opened", "e@people.test", "proxied"),
        hit("clicked", "f@people.test", "scanner"),    # only a scanner: neither
        EventRecord("P1", "opened", "f@people.test", T + timedelta(hours=2),
                    machine=True),                     # an older event without a category
    ])
    r = await engagement(store, days=30, now=NOW)
    total = r["total"]
    assert {k: total[k] for k in ("sent", "delivered", "opened", "clicked", "proxied_opens",
                                  "machine_opens", "machine_clicks")} == {
        "sent": 6, "delivered": 6, "opened": 3, "clicked": 2, "proxied_opens": 2,
        "machine_opens": 3, "machine_clicks": 1}
    assert total["open_rate"] == 0.5 and total["click_rate"] == round(2 / 6, 4)
    lines = format_table(r).splitlines()
    header = lines[1].split()
    row = dict(zip(header, lines[3].split(), strict=True))
    assert (row["opened"], row["p.opens"], row["m.opens"], row["m.clicks"]) == ("3", "2", "3", "1")


def test_cli_json_and_table(tmp_path: Path) -> None:
    import asyncio

    url = f"sqlite+aiosqlite:///{tmp_path}/crm.db"

    async def prepare() -> None:
        s = await Store.open(url)
        try:
            now = datetime.now(UTC)
            await s.record([relay("C1", ["bob@acme.test"], at=now - timedelta(hours=1),
                                  template="intro")],
                           [EventRecord("C1", "sent", "bob@acme.test", now),
                            EventRecord("C1", "clicked", "bob@acme.test", now)])
        finally:
            await s.close()

    asyncio.run(prepare())
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "store": {"url": url}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        """In this process (tests/support/cli.py); the first run is the real subprocess."""
        return mailgw_in_process(["report", "engagement", *args, "-c", str(cfg)])

    out = subprocess.run([sys.executable, "-m", "gateway", "report", "engagement", "--days", "7",
                          "--by", "template", "--json", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)                              # JSON only on stdout
    # a human click with no pixel hit at all: the person opened it (images blocked)
    assert [pick(g) for g in data["groups"]] == [("intro", 1, 1, 0, 1, 1, 0, 0, 0)]
    assert data["groups"][0]["click_rate"] == 1.0
    out = run("--days", "7")
    assert out.returncode == 0 and out.stdout.splitlines()[3].split()[:3] == ["all", "1", "1"]
    bad = run("--days", "0")
    assert bad.returncode == 2 and "--days" in bad.stderr
    bad = run("--by", "color")
    assert bad.returncode == 2


async def test_by_campaign(store: Store) -> None:
    a = relay("C1", ["bob@acme.test", "carol@acme.test"], template="promo")
    a.campaign = "q4-launch"
    await store.record([a, relay("C2", ["dan@beta.test"])],
                       [ev("C1", "sent", "bob@acme.test"), ev("C1", "sent", "carol@acme.test"),
                        ev("C1", "opened", "bob@acme.test"), ev("C2", "sent", "dan@beta.test")])
    r = await engagement(store, days=30, by="campaign", now=NOW)
    assert r["by"] == "campaign"
    assert [pick(g) for g in r["groups"]] == [
        ("q4-launch", 2, 2, 0, 1, 0, 0, 0, 0), ("(none)", 1, 1, 0, 0, 0, 0, 0, 0)]
