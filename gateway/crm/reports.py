"""Engagement report: sent, delivered, opened, clicked, replied, bounced per template, campaign, user, domain.

Definitions (``mailgw report engagement`` and ``GET /api/v1/stats/engagement``):

- **Window.** Outbound messages whose first relay source (the first spool copy
  accepted) is within the last `days` days. Mail seen only through IMAP or ingest has
  no delivery events and is not counted.
- **Unit.** A recipient of a message: (message, lower-cased recipient address).
  Every count is of such recipients, so a recipient who opens five times counts once.
- ``sent``: recipients with a ``queued`` event (accepted for delivery);
  ``delivered``: with a ``sent`` event (the upstream accepted it) and no ``bounced``
  event (a delivery report that came later says it never arrived);
  ``bounced``: with a ``bounced`` event (the scheduler's, or from a delivery report
  read in a mailbox or at the ingest or bounce address: :mod:`gateway.crm.bounces`);
  ``opened``: the recipient is a person who opened it: a human (``machine: false``) or
  ``proxied`` open (Gmail's or Yahoo's image proxy, fetched when the message was shown),
  or a human click on a copy for which no ``opened`` event of any kind was recorded (the
  pixel never loaded, images blocked: the person read it to click); machine opens
  (prefetches, Apple MPP, scanners) never make a recipient opened;
  ``clicked``: with at least one human ``clicked`` event; ``replied``: with a
  ``replied`` event (a recipient's own answer, never an auto-reply or a report);
  ``auto_replied``: with an ``auto_replied`` event
  (an out-of-office or other automatic answer from a recipient), in no rate.
- ``proxied_opens``: the number of open *events* of category ``proxied``;
  ``machine_opens`` / ``machine_clicks``: the number of open / click *events* flagged
  as machine (Apple MPP, prefetchers, link scanners), proxied opens excluded — what was
  kept out of the people counts. The category is ``details.category`` of the event.
- **Rates.** ``open_rate``, ``click_rate``, ``reply_rate`` = count / ``delivered``;
  ``delivery_rate`` and ``bounce_rate`` = count / ``sent``. A rate whose denominator
  is 0 is ``null`` in JSON and ``-`` in the table.
- **Groups.** ``--by template``: the message's template (``(none)`` without one);
  ``campaign``: its campaign (``X-Mailgw-Campaign``; ``(none)`` without one);
  ``user``: the authenticated user who sent it (``(none)`` for trusted-network mail);
  ``domain``: the recipient's domain. Without ``--by`` there is one group, ``all``.
  ``total`` sums the groups (every recipient is in exactly one group).

The counting is two GROUP BYs in the database (per recipient, then per group), on
SQLite and PostgreSQL alike; nothing iterates over events in Python.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.models import events_table, messages_table, sources_table
from gateway.crm.store import Store

GROUPINGS: tuple[str, ...] = ("template", "campaign", "user", "domain")
COUNTS: tuple[str, ...] = ("sent", "delivered", "bounced", "opened", "clicked", "replied",
                           "auto_replied", "proxied_opens", "machine_opens", "machine_clicks")
#: rate name -> (numerator, denominator)
RATES: dict[str, tuple[str, str]] = {
    "delivery_rate": ("delivered", "sent"), "bounce_rate": ("bounced", "sent"),
    "open_rate": ("opened", "delivered"), "click_rate": ("clicked", "delivered"),
    "reply_rate": ("replied", "delivered")}
NONE_GROUP = "(none)"
MAX_DAYS = 3650


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    for name, (num, den) in RATES.items():
        row[name] = round(row[num] / row[den], 4) if row[den] else None
    return row


def _domain(store: Store, address: Any) -> Any:
    if store.dialect == "postgresql":
        return sa.func.split_part(address, sa.literal_column("'@'"), sa.literal_column("2"))
    return sa.func.substr(address, sa.func.instr(address, sa.literal_column("'@'")) + 1)


async def engagement(store: Store, *, days: int = 30, by: str | None = None,
                     now: datetime | None = None) -> dict[str, Any]:
    """The engagement report as JSON-ready data: ``{days, since, by, groups: [...], total}``."""
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    now = now or datetime.now(UTC)
    since = now - timedelta(days=days)

    first_relay = (sa.select(sources_table.c.message_pk.label("pk"))
                   .where(sources_table.c.source == "relay")
                   .group_by(sources_table.c.message_pk)
                   .having(sa.func.min(sources_table.c.at) >= since)
                   .subquery("first_relay"))
    rcpt = sa.func.lower(events_table.c.recipient)
    none: Any = sa.literal_column(f"'{NONE_GROUP}'")
    group: Any
    if by == "template":
        group = sa.func.coalesce(messages_table.c.template, none)
    elif by == "campaign":
        group = sa.func.coalesce(messages_table.c.campaign, none)
    elif by == "user":
        group = sa.func.coalesce(messages_table.c.user, none)
    elif by == "domain":
        group = _domain(store, rcpt)
    else:
        group = sa.literal_column("'all'")
    ev = (sa.select(group.label("grp"), events_table.c.message_pk.label("pk"), rcpt.label("rcpt"),
                    events_table.c.type.label("type"), events_table.c.machine.label("machine"),
                    events_table.c.details["category"].as_string().label("category"))
          .select_from(events_table.join(first_relay, first_relay.c.pk == events_table.c.message_pk)
                       .join(messages_table, messages_table.c.id == events_table.c.message_pk))
          .where(messages_table.c.direction == "outbound", events_table.c.recipient != "")
          .subquery("ev"))

    def has(cond: Any) -> Any:
        return sa.func.max(sa.case((cond, 1), else_=0))

    def hits(cond: Any) -> Any:
        return sa.func.sum(sa.case((cond, 1), else_=0))

    human = ev.c.machine == sa.false()
    proxied = sa.and_(ev.c.machine == sa.true(), ev.c.category == "proxied")
    machine = sa.and_(ev.c.machine == sa.true(),
                      sa.func.coalesce(ev.c.category, "") != "proxied")
    opens = ev.c.type == "opened"
    # a person opened it: a human or proxied open, or a human click where no pixel loaded
    people_opened = has(sa.and_(opens, sa.or_(human, proxied)))
    human_clicked = has(sa.and_(ev.c.type == "clicked", human))
    opened = sa.case((people_opened == 1, 1),
                     (sa.and_(human_clicked == 1, has(opens) == 0), 1), else_=0)
    # a bounce that comes later (a delivery report after the upstream took the copy)
    # undoes the delivery: delivered + bounced <= sent
    bounced = has(ev.c.type == "bounced")
    delivered = sa.case((sa.and_(has(ev.c.type == "sent") == 1, bounced == 0), 1), else_=0)
    per_rcpt = (sa.select(
        ev.c.grp.label("grp"),
        has(ev.c.type == "queued").label("sent"),
        delivered.label("delivered"),
        bounced.label("bounced"),
        opened.label("opened"),
        human_clicked.label("clicked"),
        has(ev.c.type == "replied").label("replied"),
        has(ev.c.type == "auto_replied").label("auto_replied"),
        hits(sa.and_(opens, proxied)).label("proxied_opens"),
        hits(sa.and_(opens, machine)).label("machine_opens"),
        hits(sa.and_(ev.c.type == "clicked", machine)).label("machine_clicks"))
        .group_by(ev.c.grp, ev.c.pk, ev.c.rcpt)
        .subquery("per_rcpt"))
    per_group = (sa.select(per_rcpt.c.grp, *(sa.func.sum(per_rcpt.c[c]).label(c) for c in COUNTS))
                 .group_by(per_rcpt.c.grp))
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(per_group)).mappings().all()
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("report query failed", exc) from exc

    groups = [_rates({"group": r["grp"] if r["grp"] not in (None, "") else NONE_GROUP,
                      **{c: int(r[c] or 0) for c in COUNTS}}) for r in rows]
    groups.sort(key=lambda g: (-g["sent"], g["group"]))
    total = _rates({"group": "total", **{c: sum(g[c] for g in groups) for c in COUNTS}})
    return {"days": days, "since": since.isoformat(), "until": now.isoformat(), "by": by,
            "groups": groups, "total": total}


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table (a total line when there are several groups)."""
    title = report["by"] or "group"
    cols = [("sent", "sent"), ("delivered", "deliv"), ("bounced", "bounced"),
            ("bounce_rate", "bounce%"), ("opened", "opened"), ("open_rate", "open%"),
            ("clicked", "clicked"), ("click_rate", "click%"), ("replied", "replied"),
            ("reply_rate", "reply%"), ("auto_replied", "auto"), ("proxied_opens", "p.opens"),
            ("machine_opens", "m.opens"), ("machine_clicks", "m.clicks")]

    def cell(row: dict[str, Any], key: str) -> str:
        v = row[key]
        if key.endswith("_rate"):
            return "-" if v is None else f"{v * 100:.1f}"
        return str(v)

    rows = list(report["groups"])
    if len(rows) != 1:
        rows.append(report["total"])
    header = [title, *(h for _, h in cols)]
    body = [[str(r["group"]), *(cell(r, k) for k, _ in cols)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [f"Engagement, last {report['days']} day(s) since {report['since'][:16].replace('T', ' ')} "
           "UTC (rates: bounce% of sent, open/click/reply% of delivered; opened: people, "
           "with proxied opens and clicks where no pixel loaded; clicked: human clicks)",
           line(header), line(["-" * w for w in widths])]
    if not report["groups"]:
        out.append("(no outbound messages in this window)")
    out += [line(b) for b in body]
    return "\n".join(out)
