"""The suppression list: which events list an address, and the list itself on both backends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList, bounce_status, suppression_for
from gateway.records import AcceptedMessage, EventRecord

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def bounce(reply: str, **details: Any) -> dict[str, Any]:
    return {"type": "bounced", "recipient": "x@acme.test",
            "details": {"reply": reply, **details}}


@pytest.mark.parametrize(("event", "reason"), [
    (bounce("550 5.1.1 <x@acme.test>: Recipient address rejected: User unknown"), "bounced"),
    (bounce("550 5.1.10 RESOLVER.ADR.RecipientNotFound"), "bounced"),
    (bounce("550 5.4.1 Recipient address rejected: Access denied"), "bounced"),
    (bounce("554 5.2.1 mailbox disabled"), "bounced"),
    (bounce("550 x", status="5.1.2", hard=True), "bounced"),
    (bounce("", hard=True), "bounced"),             # a report that says hard, without a status
    (bounce("550 5.7.1 Message rejected as spam"), None),
    (bounce("552 5.2.2 Mailbox full"), None),
    (bounce("451 4.4.1 timed out", expired=True), None),
    (bounce("550 5.1.1 user unknown", expired=True), None),
    (bounce("550 rejected", hard=False), None),     # a permanent failure with no status: unknown
    ({"type": "complained", "recipient": "x@acme.test", "details": {"feedback_type": "abuse"}},
     "complained"),
    ({"type": "sent", "recipient": "x@acme.test", "details": {"reply": "250 2.0.0 ok"}}, None),
    ({"type": "deferred", "recipient": "x@acme.test", "details": {"reply": "450 4.1.1 try"}}, None),
], ids=lambda v: v if isinstance(v, str) or v is None else v["type"] + ":" + str(v["details"])[:30])
def test_which_events_suppress(event: dict[str, Any], reason: str | None) -> None:
    found = suppression_for(event)
    assert (found[0] if found else None) == reason


@given(st.dictionaries(st.sampled_from(["reply", "status", "hard", "expired", "diagnostic",
                                        "feedback_type"]),
                       st.one_of(st.text(max_size=40), st.booleans(), st.none(), st.integers())),
       st.sampled_from(["bounced", "complained", "sent", "opened"]))
def test_rules_never_crash_on_odd_details(details: dict[str, Any], type_: str) -> None:
    found = suppression_for({"type": type_, "recipient": "a@b.test", "details": details})
    assert found is None or found[0] in ("bounced", "complained")
    if found is not None:
        assert len(found[1]) <= 500
    bounce_status(details)


def _relay(qid: str, rcpts: list[str]) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@example.com>",
                           from_addr="alice@example.com", to_addrs=rcpts, cc_addrs=[],
                           subject="offer", date=T0, snippet="", size=10, recipients=rcpts,
                           user="alice@example.com", account=None, at=T0)


async def test_hard_bounces_and_complaints_list_the_address_once(store: Store) -> None:
    await store.record([_relay("Q1", ["Bob@Acme.test", "carol@acme.test", "dan@acme.test"])], [])
    await store.record([], [
        EventRecord("Q1", "bounced", "Bob@Acme.test", T0,
                    {"reply": "550 5.1.1 user unknown", "status": "5.1.1", "hard": True}),
        EventRecord("Q1", "bounced", "carol@acme.test", T0,
                    {"reply": "550 5.7.1 blocked as spam", "status": "5.7.1", "hard": True}),
        EventRecord("Q1", "complained", "dan@acme.test", T0, {"feedback_type": "abuse"})])
    sl = SuppressionList(store)
    rows = await sl.list()
    assert [(r["address"], r["reason"]) for r in rows] == [("bob@acme.test", "bounced"),
                                                           ("dan@acme.test", "complained")]
    msg = await store.get_message_by_queue_id("Q1")
    assert msg is not None and rows[0]["message_id"] == msg["id"]
    assert rows[0]["detail"].startswith("5.1.1")
    # a second bounce keeps the first reason; a replayed batch adds nothing
    await store.record([], [EventRecord("Q1", "bounced", "bob@acme.test", T0,
                                        {"reply": "550 5.1.1 again", "status": "5.1.1"})])
    assert len(await sl.list()) == 2
    assert await sl.reason("BOB@acme.test") == "bounced"
    assert await sl.reason("carol@acme.test") is None


async def test_later_mail_to_a_suppressed_address_is_marked_on_its_queued_event(store: Store) -> None:
    sl = SuppressionList(store)
    _, created = await sl.add("bob@acme.test", detail="asked us to stop", created_by="test")
    assert created
    await store.record([_relay("Q2", ["bob@acme.test", "carol@acme.test"])], [])
    msg = await store.get_message_by_queue_id("Q2")
    assert msg is not None
    queued = {e["recipient"]: e["details"] for e in msg["events"] if e["type"] == "queued"}
    assert queued == {"bob@acme.test": {"suppressed": "manual"}, "carol@acme.test": {}}


async def test_add_remove_list_and_filters(store: Store) -> None:
    sl = SuppressionList(store)
    with pytest.raises(ValueError, match="not an e-mail address"):
        await sl.add("not an address")
    row, created = await sl.add(" <Eve@Example.TEST> ", detail="by hand", created_by="cli")
    assert created and row["address"] == "eve@example.test" and row["reason"] == "manual"
    assert row["created_by"] == "cli" and row["detail"] == "by hand"
    _, again = await sl.add("eve@example.test")
    assert not again
    for a in ("a1@x.test", "a2@x.test", "b@x.test", "a_%@x.test"):
        await sl.add(a)
    assert [r["address"] for r in await sl.list(prefix="a")] == ["a1@x.test", "a2@x.test",
                                                                 "a_%@x.test"]
    assert [r["address"] for r in await sl.list(prefix="a_%")] == ["a_%@x.test"]
    page = await sl.list(limit=2)
    rest = await sl.list(after=page[-1]["address"])
    assert [r["address"] for r in page + rest] == sorted(r["address"] for r in await sl.list())
    assert [r["address"] for r in await sl.list(reason="bounced")] == []
    with pytest.raises(ValueError):
        await sl.list(reason="nope")
    assert await sl.remove("EVE@example.test") is True
    assert await sl.remove("eve@example.test") is False
    assert await sl.get("eve@example.test") is None


async def test_listed_addresses_are_cached_briefly_unlisted_never(store: Store) -> None:
    now = [100.0]
    sl = SuppressionList(store, clock=lambda: now[0], ttl=5.0)
    other = SuppressionList(store)
    assert await sl.reason("z@x.test") is None
    await other.add("z@x.test")                  # another node adds it: seen at once
    assert await sl.reason("z@x.test") == "manual"
    await other.remove("z@x.test")               # removed elsewhere: within the TTL, cached
    assert await sl.reason("z@x.test") == "manual"
    now[0] += 5.1
    assert await sl.reason("z@x.test") is None
    await sl.add("z@x.test")
    await sl.reason("z@x.test")
    await sl.remove("z@x.test")                  # a write here takes effect here at once
    assert await sl.reason("z@x.test") is None
