"""The per-message tracking summary: opens by kind, machine opens by category, clicks per
link, activity by people only, the people rule for opened, per recipient and in total."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.crm.summary import recipient_summary, summarize

T = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
PRICING = "https://acme.test/pricing"
DEMO = "https://acme.test/demo"


def hit(type_: str, rcpt: str, minutes: int, category: str, url: str | None = None,
        **details: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"category": category, **details}
    if url:
        d["url"] = url
    return {"type": type_, "at": T + timedelta(minutes=minutes), "recipient": rcpt,
            "machine": category != "human", "details": d}


EVENTS = [
    {"type": "queued", "at": T, "recipient": "Bob@Acme.test", "machine": False, "details": {}},
    {"type": "queued", "at": T, "recipient": "carol@acme.test", "machine": False, "details": {}},
    {"type": "queued", "at": T, "recipient": "dan@acme.test", "machine": False, "details": {}},
    hit("opened", "bob@acme.test", 0, "proxy"),                 # Apple MPP, on download
    hit("opened", "bob@acme.test", 90, "proxied"),              # Gmail's proxy, on display
    hit("opened", "BOB@acme.test", 95, "human"),
    hit("clicked", "bob@acme.test", 1, "scanner", PRICING),     # Safe Links at delivery
    hit("clicked", "bob@acme.test", 1, "honeypot", "https://acme.test/hp", honeypot=True),
    hit("clicked", "bob@acme.test", 96, "human", PRICING),
    hit("clicked", "carol@acme.test", 200, "human", DEMO),      # images blocked, clicked
    {"type": "opened", "at": T + timedelta(minutes=5), "recipient": "dan@acme.test",
     "machine": True, "details": {}},                           # recorded before categories
]


def test_totals_and_recipients_exact() -> None:
    s = summarize(EVENTS)
    assert s["total"] == {
        "opens": 4, "unique_opens": 2, "human_opens": 1, "proxied_opens": 1, "machine_opens": 2,
        "machine_opens_by_category": {"machine": 1, "proxy": 1},
        "clicks": 4, "human_clicks": 2, "machine_clicks": 2,
        "machine_clicks_by_category": {"honeypot": 1, "scanner": 1},
        "links": {DEMO: {"clicks": 1, "human_clicks": 1}, PRICING: {"clicks": 2, "human_clicks": 1}},
        "first_activity": "2026-12-01T11:30:00+00:00", "last_activity": "2026-12-01T13:20:00+00:00",
        "opened": True, "recipients_opened": 2}
    assert [r["recipient"] for r in s["recipients"]] == ["bob@acme.test", "carol@acme.test",
                                                         "dan@acme.test"]
    bob, carol, dan = s["recipients"]
    assert (bob["opens"], bob["unique_opens"], bob["human_opens"], bob["proxied_opens"],
            bob["machine_opens"], bob["clicks"], bob["human_clicks"], bob["opened"]) == (
        3, 1, 1, 1, 1, 3, 1, True)
    # the machine hits at delivery are no activity: people from 11:30 (the proxied open)
    assert (bob["first_activity"], bob["last_activity"]) == (
        "2026-12-01T11:30:00+00:00", "2026-12-01T11:36:00+00:00")
    assert carol["opened"] is True and carol["opens"] == 0 and carol["unique_opens"] == 0
    assert carol["first_activity"] == carol["last_activity"] == "2026-12-01T13:20:00+00:00"
    assert dan["opened"] is False and dan["machine_opens_by_category"] == {"machine": 1}
    assert dan["first_activity"] is None and dan["links"] == {}
    assert recipient_summary(s, " Dan@ACME.test") == dan
    assert recipient_summary(s, "nobody@acme.test") is None


def test_opened_is_the_people_rule() -> None:
    def opened(*hits: dict[str, Any]) -> bool:
        return bool(summarize(hits)["recipients"][0]["opened"])

    assert opened(hit("opened", "x@y.test", 10, "proxied"))
    assert opened(hit("clicked", "x@y.test", 10, "human", PRICING))
    # a machine loaded the pixel: the click does not stand in for an open
    assert not opened(hit("opened", "x@y.test", 0, "proxy"),
                      hit("clicked", "x@y.test", 10, "human", PRICING))
    assert not opened(hit("opened", "x@y.test", 0, "prefetch"),
                      hit("clicked", "x@y.test", 0, "scanner", PRICING))


def test_iso_times_as_the_api_shows_them_and_no_hits() -> None:
    evs = [{**e, "at": e["at"].isoformat()} for e in EVENTS]
    assert summarize(evs) == summarize(EVENTS)
    empty = summarize([EVENTS[0]])
    assert empty["total"]["opens"] == 0 and empty["total"]["opened"] is False
    assert empty["total"]["first_activity"] is None and empty["total"]["recipients_opened"] == 0
    assert [r["recipient"] for r in empty["recipients"]] == ["bob@acme.test"]
    assert summarize([]) == {"total": summarize([])["total"], "recipients": []}
