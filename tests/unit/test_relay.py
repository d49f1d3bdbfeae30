"""Relay.accept: where the outbound planning runs (the event loop must stay free for big work),
what it records (control headers, the Bcc field's display names)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.mail.parse import parse_message
from gateway.pipeline.outbound import CopyPlan, Outbound
from gateway.records import fill_from_parsed
from gateway.relay import Relay, Submission
from gateway.spool import Spool
from tests.unit.test_outbound import HTML, setup

USER = "alice@example.com"


async def test_several_recipients_are_planned_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning costs about a millisecond per tracked copy (stages, RSA): a small message to
    100 recipients must not hold every other session for a tenth of a second."""
    out = setup(tmp_path, {})                  # opens and clicks tracked: a copy per recipient
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    real = Outbound.plan

    def spy(self: Outbound, *args: Any, **kwargs: Any) -> list[CopyPlan]:
        on_loop.append(threading.get_ident() == loop_thread)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Outbound, "plan", spy)
    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out)
    try:
        many = [f"r{i}@acme.test" for i in range(20)]
        await relay.accept(Submission(USER, many, HTML, user=USER))
        await relay.accept(Submission(USER, ["a@acme.test"], HTML, user=USER))
    finally:
        spool.close()
    assert on_loop == [False, True]        # several copies: a worker thread; one small copy: the loop
    assert len(spool.list_ids("incoming")) == 21


class Sink:
    """An EventSink keeping what the relay records."""

    def __init__(self) -> None:
        self.accepted: list[Any] = []

    def add_accepted(self, a: Any) -> None:
        self.accepted.append(a)

    def add_event(self, e: Any) -> None:
        raise AssertionError("the relay records no events")


def with_controls(*lines: str, data: bytes = HTML) -> bytes:
    return "".join(f"{x}\r\n" for x in lines).encode() + data


async def test_control_headers_are_read_stripped_and_recorded(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.mail.controls import has_controls

    out = setup(tmp_path, {})                  # tracking on for everyone
    spool = Spool(tmp_path / "spool")
    spool.setup()
    sink = Sink()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out, events=sink)
    at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    data = with_controls("X-Mailgw-Template: offer-1", "X-Mailgw-Campaign:  Q4 ",
                         "X-Mailgw-No-Track: yes", f"X-Mailgw-Send-At: {at.isoformat()}")
    try:
        qid = await relay.accept(Submission(USER, ["a@acme.test", "b@acme.test"], data,
                                            user=USER))
        [only] = spool.list_ids("incoming")      # no tracking: one shared copy
        env, spooled = spool.read("incoming", only)
    finally:
        spool.close()
    assert only == qid
    assert not has_controls(spooled) and b"X-Mailgw" not in spooled
    # no pixel, no links
    assert not re.search(rb"://[^/\s\"]+/o/", spooled) and b"t.example.com" not in spooled
    assert env.scheduled_for == at.timestamp()
    [a] = sink.accepted
    assert (a.template, a.campaign, a.scheduled_at) == ("offer-1", "Q4", at)
    assert a.raw is not None and b"X-Mailgw" not in a.raw


async def test_a_bad_control_header_refuses_the_message_and_spools_nothing(
        tmp_path: Path) -> None:
    from gateway.mail.controls import ControlHeaderError

    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test")
    try:
        for line in ("X-Mailgw-Send-At: next tuesday", "X-Mailgw-No-Track: perhaps"):
            with pytest.raises(ControlHeaderError) as err:
                await relay.accept(Submission(USER, ["a@acme.test"], with_controls(line)))
            assert err.value.smtp_reply().startswith(f"554 5.6.0 {line.split(':')[0]}:")
    finally:
        spool.close()
    assert spool.list_ids("incoming") == [] and relay.accepted == 0


async def test_the_ingest_copy_of_a_scheduled_send_is_not_held(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test", is_ingest=lambda r: r.startswith("crm@"))
    at = datetime.now(UTC) + timedelta(hours=1)
    data = with_controls(f"X-Mailgw-Send-At: {at.isoformat()}")
    try:
        await relay.accept(Submission(USER, ["a@acme.test", "crm@gw.example.test"], data))
        envs = [spool.read_envelope("incoming", q) for q in spool.list_ids("incoming")]
    finally:
        spool.close()
    assert {e.route: e.scheduled_for for e in envs} == {None: at.timestamp(), "ingest": None}


async def test_policy_header_rules_still_match_the_control_headers(tmp_path: Path) -> None:
    """Rules may match on a control header (here the campaign) although the copies leave
    without it."""
    rule = ("- name: quiet campaign\n  match:\n    header: {name: X-Mailgw-Campaign, value: vip}\n"
            "  set: {track_opens: false, track_clicks: false}\n")
    out = setup(tmp_path, {"10.yaml": rule})
    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out)
    try:
        await relay.accept(Submission(USER, ["a@acme.test"], with_controls("X-Mailgw-Campaign: vip"),
                                      user=USER))
        await relay.accept(Submission(USER, ["a@acme.test"], with_controls("X-Mailgw-Campaign: x"),
                                      user=USER))
        copies = [spool.read("incoming", q)[1] for q in spool.list_ids("incoming")]
    finally:
        spool.close()
    assert all(b"X-Mailgw" not in c for c in copies)
    assert sorted(b"t.example.com" in c for c in copies) == [False, True]


async def test_every_copy_is_logged_under_the_id_the_client_got(tmp_path: Path) -> None:
    """`250 ... queued as ID` must lead an operator to each per-recipient copy: one
    queued_copy line per copy names the group (ID), the copy's queue id, the Message-ID
    and its recipients."""
    from structlog.testing import capture_logs

    out = setup(tmp_path, {})                  # tracked: a copy per recipient
    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out)
    try:
        with capture_logs() as logs:
            qid = await relay.accept(Submission(USER, ["a@acme.test", "b@acme.test"], HTML,
                                                user=USER))
        copies = spool.list_ids("incoming")
        message_id = spool.read_envelope("incoming", copies[0]).message_id
    finally:
        spool.close()
    lines = [x for x in logs if x["event"] == "queued_copy"]
    assert len(copies) == 2 and qid in copies
    assert sorted(x["queue_id"] for x in lines) == sorted(copies)
    assert all(x["group"] == qid and x["message_id"] == message_id and message_id
               for x in lines)
    assert sorted(r for x in lines for r in x["rcpts"]) == ["a@acme.test", "b@acme.test"]


async def test_the_record_rebuilt_from_the_spool_is_the_relays(tmp_path: Path) -> None:
    """A record lost in a crash is rebuilt from the queue files (`accepted_from_spool`):
    the same copies, recipients, sender, template and campaign as the relay's own."""
    from gateway.relay import accepted_from_spool

    out = setup(tmp_path, {})                  # tracked: one copy per recipient
    spool = Spool(tmp_path / "spool")
    spool.setup()
    sink = Sink()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out, events=sink)
    data = with_controls("X-Mailgw-Template: offer-1", "X-Mailgw-Campaign: Q4")
    try:
        await relay.accept(Submission(USER, ["a@acme.test", "b@acme.test"], data, user=USER,
                                      client_ip="192.0.2.7"))
        entries = [spool.read("incoming", q) for q in spool.list_ids("incoming")]
    finally:
        spool.close()
    [recorded] = sink.accepted
    rebuilt = accepted_from_spool(entries)
    assert rebuilt is not None
    fields = ("queue_id", "message_id", "from_addr", "user", "account", "client_ip",
              "template", "campaign", "scheduled_at", "at")
    assert {f: getattr(rebuilt, f) for f in fields} == {f: getattr(recorded, f) for f in fields}
    assert sorted(rebuilt.recipients) == sorted(recorded.recipients)
    assert sorted(rebuilt.copies, key=lambda c: c.queue_id) == \
        sorted(recorded.copies, key=lambda c: c.queue_id)
    assert rebuilt.raw is not None and not rebuilt.raw.startswith(b"Received:")
    assert b"X-Mailgw-" not in rebuilt.raw


async def test_the_bcc_fields_display_names_name_the_bcc_contacts(tmp_path: Path,
                                                                  store: Store) -> None:
    """The relay removes the Bcc field from what it spools and records, but the names in it
    still name the contacts its recipients become."""
    spool = Spool(tmp_path / "spool")
    spool.setup()
    sink = Sink()
    relay = Relay(spool, "gw.example.test", events=sink)
    data = HTML.replace(b"Subject: Offer\r\n", b'Subject: Offer\r\nBcc: "Gina Rossi" '
                        b"<Gina@Delta.test>, =?utf-8?q?Jos=C3=A9_=C3=81lvarez?= <jose@eps.test>,"
                        b"\r\n plain@zeta.test\r\n")
    rcpts = ["a@acme.test", "gina@delta.test", "jose@eps.test", "plain@zeta.test"]
    try:
        await relay.accept(Submission(USER, rcpts, data, user=USER))
        [only] = spool.list_ids("incoming")
        _, spooled = spool.read("incoming", only)
    finally:
        spool.close()
    [a] = sink.accepted
    assert a.raw is not None and b"Bcc:" not in a.raw and b"Gina" not in a.raw
    assert b"Gina" not in spooled
    assert a.bcc_names == {"gina@delta.test": "Gina Rossi", "jose@eps.test": "José Álvarez"}
    fill_from_parsed(a, parse_message(a.raw))        # what the store writer does
    store.configure(LinkRules(auto_create_contacts=True,
                              own_addresses=frozenset({USER}), own_domains=frozenset({"example.com"})))
    await store.record([a], [])
    [m] = await store.list_messages()
    assert m["bcc"] == ["gina@delta.test", "jose@eps.test", "plain@zeta.test"]
    assert {c["email"]: c["name"] for c in m["contacts"] if c["role"] == "bcc"} == {
        "gina@delta.test": "Gina Rossi", "jose@eps.test": "José Álvarez", "plain@zeta.test": ""}
