"""Companies as the CRM reads them: the list with counts, one company with its contacts, its timeline.

A company is known by its e-mail domain (``companies.domain``, lower case); it is made by
a contact import or upsert (:mod:`gateway.crm.contacts`) and messages are linked to it by
the domains of their addresses (``message_companies``, :mod:`gateway.crm.linking`). Counts
are per page: one grouped query over the page's companies, never over the whole table.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.contacts import _contact_dict, _contact_select
from gateway.crm.identify import contact_addresses
from gateway.crm.models import (
    companies_table,
    contacts_table,
    message_companies_table,
    messages_table,
    sort_at,
)
from gateway.crm.sql import chunks, iso
from gateway.crm.store import Store

#: a domain as companies are known by: dot-separated labels of letters, digits, ``-`` or
#: ``_`` (internationalised letters too), at most 253 characters
_DOMAIN_RE = re.compile(r"(?=.{1,253}\Z)[\w-]+(?:\.[\w-]+)*\Z")
#: contacts listed with one company (``contact_count`` has them all)
COMPANY_CONTACTS = 200


def normalize_domain(value: str) -> str | None:
    """`value` as a company domain (stripped, lower case, no trailing dot), or None when it
    cannot be one (empty, spaces, ``@``, ``/``, an empty label, too long)."""
    d = value.strip().lower().removesuffix(".")
    return d if _DOMAIN_RE.fullmatch(d) else None


def _company_dict(r: Any, stats: tuple[int, int, datetime | None]) -> dict[str, Any]:
    """A ``companies`` row as the API and ``companies list/show --json`` show it: its domain,
    name, owner (the user login shared mailboxes assign its people's mail to, or None),
    its counts and the time of its newest linked message."""
    contacts, messages, last = stats
    return {"domain": r["domain"], "name": r["name"], "owner": r["owner"],
            "contact_count": contacts, "message_count": messages, "last_activity": iso(last),
            "created_at": iso(r["created_at"]), "updated_at": iso(r["updated_at"])}


async def _stats(conn: AsyncConnection,
                 ids: list[int]) -> dict[int, tuple[int, int, datetime | None]]:
    """Per company id: its contacts, its linked messages and the newest message's time."""
    contacts: dict[int, int] = {}
    messages: dict[int, tuple[int, datetime | None]] = {}
    for chunk in chunks(ids):
        rows = await conn.execute(
            sa.select(contacts_table.c.company_pk, sa.func.count())
            .where(contacts_table.c.company_pk.in_(chunk)).group_by(contacts_table.c.company_pk))
        contacts.update({pk: int(n) for pk, n in rows.all()})
        rows = await conn.execute(
            sa.select(message_companies_table.c.company_pk, sa.func.count(), sa.func.max(sort_at))
            .join(messages_table, messages_table.c.id == message_companies_table.c.message_pk)
            .where(message_companies_table.c.company_pk.in_(chunk))
            .group_by(message_companies_table.c.company_pk))
        messages.update({pk: (int(n), last) for pk, n, last in rows.all()})
    return {pk: (contacts.get(pk, 0), *messages.get(pk, (0, None))) for pk in ids}


async def list_companies(store: Store, *, search: str | None = None, after: str | None = None,
                         limit: int = 100) -> list[dict[str, Any]]:
    """Companies in domain order, with their counts; `search` matches part of the domain or
    the name (case-insensitive); `after` is a cursor (the last domain of the previous page)."""
    q = sa.select(companies_table).order_by(companies_table.c.domain)
    if search:
        like = f"%{search.lower()}%"
        q = q.where(sa.or_(companies_table.c.domain.like(like),
                           sa.func.lower(companies_table.c.name).like(like)))
    if after:
        q = q.where(companies_table.c.domain > after.lower())
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(q.limit(max(0, limit)))).mappings().all()
            stats = await _stats(conn, [r["id"] for r in rows])
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("store read failed", exc) from exc
    return [_company_dict(r, stats[r["id"]]) for r in rows]


async def get_company(store: Store, domain: str, *,
                      contacts: bool = True) -> dict[str, Any] | None:
    """One company with its counts and (with `contacts`) its first :data:`COMPANY_CONTACTS`
    contacts in e-mail order; None when no company has this domain."""
    try:
        async with store.engine.connect() as conn:
            row = (await conn.execute(sa.select(companies_table).where(
                companies_table.c.domain == domain.strip().lower()))).mappings().first()
            if row is None:
                return None
            stats = await _stats(conn, [row["id"]])
            people = None
            extra: dict[int, list[str]] = {}
            if contacts:
                people = (await conn.execute(
                    _contact_select().where(contacts_table.c.company_pk == row["id"])
                    .order_by(contacts_table.c.email).limit(COMPANY_CONTACTS))).mappings().all()
                extra = await contact_addresses(conn, [c["id"] for c in people])
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("store read failed", exc) from exc
    out = _company_dict(row, stats[row["id"]])
    if people is not None:
        out["contacts"] = [_contact_dict(c, extra.get(c["id"], [])) for c in people]
    return out


async def company_timeline(store: Store, domain: str, *,
                           before: tuple[datetime, int] | None = None,
                           limit: int = 50) -> list[dict[str, Any]]:
    """The messages linked to the company with this domain, newest first (as a contact's
    timeline: by Date, else by when stored; `before` is the cursor's (time, id))."""
    linked = (sa.select(message_companies_table.c.message_pk)
              .join(companies_table, companies_table.c.id == message_companies_table.c.company_pk)
              .where(companies_table.c.domain == domain.strip().lower()))
    return await store.timeline(linked, before=before, limit=limit)
