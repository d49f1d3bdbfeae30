"""The tracking summary of one message: opens, clicks and activity, per recipient and in total.

A pure function over the message's events (nothing here queries): the read API and
``mailgw messages show`` compute it from the events they already read, the
``message.opened`` / ``message.clicked`` webhooks from one query over the message's hit
events in the transaction that recorded the hit. Only ``opened`` and ``clicked`` events
count; the others only put their recipient in the list (with zeros).

Per recipient (lower-cased address) and in ``total``:

- ``opens``: every ``opened`` event (pixel fetches of any kind); ``unique_opens``: 1 per
  recipient with at least one of them (in ``total``: how many recipients that is);
- ``human_opens`` (``machine: false``), ``proxied_opens`` (category ``proxied``: Gmail's
  or Yahoo's image proxy fetched it when the message was shown, a person probably opened)
  and ``machine_opens`` (every other machine open), with ``machine_opens_by_category``
  (category -> count: ``proxy`` for Apple Mail Privacy Protection, ``prefetch``,
  ``scanner``, ``sender``, ``timing``...; ``machine`` for events recorded without a
  category);
- ``clicks``, ``human_clicks``, ``machine_clicks`` and ``machine_clicks_by_category``
  (honeypot hits are machine clicks of category ``honeypot``);
- ``links``: per clicked URL ``{clicks, human_clicks}`` (the hidden honeypot link is left
  out: it is no link of the message a person could choose);
- ``first_activity`` / ``last_activity``: the first and last open or click by a person
  (human opens, proxied opens, human clicks), ISO 8601 in UTC, ``null`` when none: a
  sales rep asks when the customer looked, not when a scanner did;
- ``opened``: the people rule of the engagement report (:mod:`gateway.crm.reports`): a
  human or proxied open, or a human click on a copy without any ``opened`` event (images
  blocked). In ``total`` it is true when any recipient opened, and ``recipients_opened``
  counts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.crm.sql import iso

HIT_TYPES: tuple[str, ...] = ("opened", "clicked")
PROXIED = "proxied"
#: the category of a machine hit recorded before hits carried one
UNKNOWN_MACHINE = "machine"
_COUNTS = ("opens", "unique_opens", "human_opens", "proxied_opens", "machine_opens",
           "clicks", "human_clicks", "machine_clicks")


def _at(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


class _Tally:
    """Counts for one recipient, or for the whole message."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.machine_opens_by: dict[str, int] = {}
        self.machine_clicks_by: dict[str, int] = {}
        self.links: dict[str, dict[str, int]] = {}
        self.first: datetime | None = None
        self.last: datetime | None = None

    def add(self, e: Mapping[str, Any]) -> None:
        details = e.get("details") or {}
        machine = bool(e.get("machine"))
        category = str(details.get("category") or (UNKNOWN_MACHINE if machine else "human"))
        person = not machine or category == PROXIED
        c = self.counts
        if e["type"] == "opened":
            c["opens"] += 1
            c["unique_opens"] = 1
            if not machine:
                c["human_opens"] += 1
            elif category == PROXIED:
                c["proxied_opens"] += 1
            else:
                c["machine_opens"] += 1
                self.machine_opens_by[category] = self.machine_opens_by.get(category, 0) + 1
        else:
            c["clicks"] += 1
            if machine:
                person = False      # a proxy fetching a link is no person's click
                c["machine_clicks"] += 1
                self.machine_clicks_by[category] = self.machine_clicks_by.get(category, 0) + 1
            else:
                c["human_clicks"] += 1
            url = details.get("url")
            if isinstance(url, str) and url and not details.get("honeypot"):
                link = self.links.setdefault(url, {"clicks": 0, "human_clicks": 0})
                link["clicks"] += 1
                link["human_clicks"] += 0 if machine else 1
        at = _at(e.get("at"))
        if person and at is not None:
            self.first = at if self.first is None else min(self.first, at)
            self.last = at if self.last is None else max(self.last, at)

    @property
    def opened(self) -> bool:
        c = self.counts
        return bool(c["human_opens"] or c["proxied_opens"] or (c["human_clicks"] and not c["opens"]))

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts,
                "machine_opens_by_category": dict(sorted(self.machine_opens_by.items())),
                "machine_clicks_by_category": dict(sorted(self.machine_clicks_by.items())),
                "links": {u: dict(v) for u, v in sorted(self.links.items())},
                "first_activity": iso(self.first), "last_activity": iso(self.last),
                "opened": self.opened}

    def merge(self, other: _Tally) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        for mine, theirs in ((self.machine_opens_by, other.machine_opens_by),
                             (self.machine_clicks_by, other.machine_clicks_by)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for url, link in other.links.items():
            into = self.links.setdefault(url, {"clicks": 0, "human_clicks": 0})
            into["clicks"] += link["clicks"]
            into["human_clicks"] += link["human_clicks"]
        for at in (other.first, other.last):
            if at is not None:
                self.first = at if self.first is None else min(self.first, at)
                self.last = at if self.last is None else max(self.last, at)


def summarize(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of one message's events (``type, at, recipient, machine, details`` each,
    ``at`` a datetime or ISO 8601 text): ``{"total": {...}, "recipients": [{"recipient":
    ..., ...}, ...]}``, recipients in address order (see the module docstring)."""
    per: dict[str, _Tally] = {}
    for e in events:
        rcpt = str(e.get("recipient") or "").strip().lower()
        if rcpt:
            tally = per.setdefault(rcpt, _Tally())
        elif e.get("type") in HIT_TYPES:
            tally = per.setdefault("", _Tally())    # a hit without a recipient: total only
        else:
            continue
        if e.get("type") in HIT_TYPES:
            tally.add(e)
    total = _Tally()
    for t in per.values():
        total.merge(t)
    out = total.as_dict()
    opened = [r for r, t in per.items() if r and t.opened]
    out["unique_opens"] = sum(1 for r, t in per.items() if r and t.counts["opens"])
    out["opened"] = bool(opened)
    out["recipients_opened"] = len(opened)
    recipients = []
    for rcpt, t in sorted(per.items()):
        if rcpt:
            recipients.append({"recipient": rcpt, **t.as_dict()})
    return {"total": out, "recipients": recipients}


def recipient_summary(summary: Mapping[str, Any], recipient: str) -> dict[str, Any] | None:
    """The entry of `recipient` (any case) in a :func:`summarize` result, or None."""
    want = recipient.strip().lower()
    return next((r for r in summary["recipients"] if r["recipient"] == want), None)
