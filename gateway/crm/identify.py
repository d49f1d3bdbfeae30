"""Which contact each correspondent of new mail is: by any of its addresses, by its name, or made anew.

The store calls :func:`resolve` inside the transaction that stores a batch, with the
linkable addresses of its new messages (From, To, Cc, the relay's Bcc, invitation
attendees) and their display names. In order, for each address:

1. a contact's own address (``contacts.email``) or one of its further addresses
   (``contact_addresses``) is that contact;
2. with ``crm.link_by: name``, an unknown address whose display name is plain
   (:func:`gateway.crm.people.split_name`) and whose :func:`~gateway.crm.people.name_key`
   is the full name of exactly one contact becomes that contact's further address
   (``source: name``) and is linked, with the mail already stored for it; when several
   contacts have that name, nothing is linked or made and the address is listed in
   ``contact_ambiguities`` (:func:`list_ambiguous`) until a contact has it;
3. with ``crm.auto_create_contacts``, any other address becomes a contact named after
   its display name (:func:`gateway.crm.people.split_name`), and its domain a company
   (:func:`_make_companies`) unless free mail or ours.

The names of a contact that exists are never changed (imported data wins); only a
contact made automatically with neither name (its first mail gave none, as for a Bcc
recipient) takes them from a later plain display name of its own address, unless the
address is a role's (:func:`gateway.crm.people.role_address`: ``sales@``) (:func:`_fill_names`).

Names are matched against the contacts that existed before the batch: two new
addresses of one new person in the same batch make two contacts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.linking import LinkRules
from gateway.crm.models import (
    addresses_table,
    ambiguities_table,
    companies_table,
    contact_addresses_table,
    contacts_table,
    message_companies_table,
    message_contacts_table,
)
from gateway.crm.people import name_key, role_address, split_name
from gateway.crm.sql import Database, chunks, insert, iso
from gateway.mail.addresses import domain_of
from gateway.records import clean_text

CompanyIds = Callable[[AsyncConnection, Sequence[str]], Awaitable[dict[str, int]]]


async def contact_ids(conn: AsyncConnection, emails: Sequence[str]) -> dict[str, int]:
    """Address -> contact pk, by a contact's own address or one of its further ones."""
    out: dict[str, int] = {}
    extra = contact_addresses_table.c
    for chunk in chunks(list(emails)):
        rows = await conn.execute(sa.select(contacts_table.c.email, contacts_table.c.id)
                                  .where(contacts_table.c.email.in_(chunk)))
        out.update({e: pk for e, pk in rows.all()})
        rest = [e for e in chunk if e not in out]
        if rest:
            rows = await conn.execute(sa.select(extra.address, extra.contact_pk)
                                      .where(extra.address.in_(rest)))
            out.update({e: pk for e, pk in rows.all()})
    return out


def name_keys(names: Mapping[str, str], addresses: Sequence[str]) -> set[str]:
    """The name keys of the plain display names of `addresses` (`names`: lower-cased
    address -> display name), as `link_by: name` would look them up."""
    return {k for a in addresses if (k := name_key(*split_name(names.get(a, ""), a)))}


async def known_names(conn: AsyncConnection, keys: Sequence[str]) -> set[str]:
    """The name keys among `keys` that some contact has."""
    out: set[str] = set()
    for chunk in chunks(list(keys)):
        rows = await conn.execute(sa.select(contacts_table.c.name_key).distinct()
                                  .where(contacts_table.c.name_key.in_(chunk)))
        out.update(rows.scalars())
    return out


async def resolve(conn: AsyncConnection, dialect: str, rules: LinkRules, names: Mapping[str, str],
                  now: datetime, company_ids: CompanyIds, *,
                  counts: Mapping[str, int] | None = None,
                  batch: Sequence[int] = ()) -> dict[str, int]:
    """Address -> contact pk for the addresses of `names` (lower-cased, linkable; each with
    its display name or ""), by the rules of the module docstring; `counts` says in how
    many messages each appeared (for the ambiguity list), `batch` are the messages being
    stored now (linked by the caller, so left out of the history linking)."""
    if not rules.links_contacts or not names:
        return {}
    found = await contact_ids(conn, sorted(names))
    await _fill_names(conn, names, found, now)
    missing = [a for a in names if a not in found]
    ambiguous: set[str] = set()
    if rules.link_by_name and missing:
        ambiguous = await _by_name(conn, dialect, names, missing, found, now, counts or {}, batch)
    if rules.auto_create_contacts:
        rest = [a for a in missing if a not in found and a not in ambiguous]
        if rest:
            await _create(conn, dialect, rules, names, rest, now, company_ids, batch)
            found.update(await contact_ids(conn, rest))
    return found


async def _fill_names(conn: AsyncConnection, names: Mapping[str, str], found: Mapping[str, int],
                      now: datetime) -> None:
    """A contact made automatically without names (its first mail gave none, e.g. a Bcc
    recipient) takes them from a later display name of its own address: never a contact
    with a name, never an imported or API one."""
    named = {a: (first, last) for a in found if names.get(a) and not role_address(a)
             for first, last in [split_name(names[a], a)] if first}
    if not named:
        return
    c = contacts_table.c
    rows: list[dict[str, Any]] = []
    for chunk in chunks(sorted(named)):
        nameless = await conn.execute(   # by its own address, not a further one
            sa.select(c.id, c.email).where(c.email.in_(chunk), c.source == "auto",
                                           c.first_name == "", c.last_name == ""))
        for pk, email in nameless.all():
            first, last = (clean_text(x)[:200] for x in named[email])
            rows.append({"_id": pk, "first_name": first, "last_name": last,
                         "name_key": name_key(first, last), "updated_at": now})
    if rows:
        # the conditions again: what a concurrent writer named first stays
        await conn.execute(
            sa.update(contacts_table)
            .where(c.id == sa.bindparam("_id"), c.source == "auto", c.first_name == "",
                   c.last_name == ""), rows)


async def _by_name(conn: AsyncConnection, dialect: str, names: Mapping[str, str],
                   missing: list[str], found: dict[str, int], now: datetime,
                   counts: Mapping[str, int], batch: Sequence[int]) -> set[str]:
    """`link_by: name` for the unknown addresses: link (into `found`), returns the ambiguous."""
    keyed = {a: k for a in missing if (k := name_key(*split_name(names[a], a)))}
    if not keyed:
        return set()
    matches: dict[str, list[tuple[int, str]]] = {}
    for chunk in chunks(sorted(set(keyed.values()))):
        rows = await conn.execute(
            sa.select(contacts_table.c.name_key, contacts_table.c.id, contacts_table.c.email)
            .where(contacts_table.c.name_key.in_(chunk)).order_by(contacts_table.c.email))
        for k, pk, email in rows.all():
            matches.setdefault(k, []).append((pk, email))
    linked: dict[str, int] = {}
    unsure: dict[str, list[str]] = {}
    for a, k in keyed.items():
        candidates = matches.get(k, [])
        if len(candidates) == 1:
            linked[a] = candidates[0][0]
        elif candidates:
            unsure[a] = [email for _, email in candidates]
    if linked:
        stmt = insert(dialect, contact_addresses_table).on_conflict_do_nothing(
            index_elements=[contact_addresses_table.c.address])
        extra = [{"address": a, "contact_pk": pk, "source": "name", "created_at": now}
                 for a, pk in sorted(linked.items())]
        for chunk in chunks(extra):
            await conn.execute(stmt, list(chunk))
        # what a concurrent writer may have decided first wins: read back
        found.update(await contact_ids(conn, sorted(linked)))
        await _link_history(conn, dialect, sorted(linked), batch)
        await conn.execute(sa.delete(ambiguities_table)
                           .where(ambiguities_table.c.address.in_(sorted(linked))))
    if unsure:
        await _list_ambiguous(conn, dialect, names, unsure, now, counts)
    return set(unsure)


async def _link_history(conn: AsyncConnection, dialect: str, addresses: list[str],
                        batch: Sequence[int]) -> None:
    """Mail stored earlier with an address just given to a contact is linked to it."""
    extra = contact_addresses_table.c
    for chunk in chunks(addresses):
        sel = (sa.select(addresses_table.c.message_pk, extra.contact_pk, addresses_table.c.role)
               .join(contact_addresses_table, extra.address == addresses_table.c.address)
               .where(extra.address.in_(chunk)))
        if batch:
            sel = sel.where(addresses_table.c.message_pk.not_in(list(batch)))
        stmt = insert(dialect, message_contacts_table).from_select(
            ["message_pk", "contact_pk", "role"], sel)
        await conn.execute(stmt.on_conflict_do_nothing())


async def _list_ambiguous(conn: AsyncConnection, dialect: str, names: Mapping[str, str],
                          unsure: dict[str, list[str]], now: datetime,
                          counts: Mapping[str, int]) -> None:
    table = ambiguities_table
    for address, candidates in sorted(unsure.items()):
        seen = counts.get(address, 1)
        stmt = insert(dialect, table).values(
            address=address, name=clean_text(names[address])[:200], candidates=candidates,
            messages=seen, first_seen_at=now, last_seen_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.address],
            set_={"name": stmt.excluded.name, "candidates": stmt.excluded.candidates,
                  "messages": table.c.messages + seen, "last_seen_at": now})
        await conn.execute(stmt)


async def _create(conn: AsyncConnection, dialect: str, rules: LinkRules, names: Mapping[str, str],
                  emails: list[str], now: datetime, company_ids: CompanyIds,
                  batch: Sequence[int]) -> None:
    """Contacts made automatically (`crm.auto_create_contacts`), named after their display
    name, each with the company of its domain (made now where there is none)."""
    domains = sorted({d for e in emails if (d := rules.company_domain(e))})
    companies = await company_ids(conn, domains) if domains else {}
    if len(companies) < len(domains):
        await _make_companies(conn, dialect, [d for d in domains if d not in companies], now,
                              batch)
        companies = await company_ids(conn, domains)
    rows: list[dict[str, Any]] = []
    for e in emails:
        first, last = split_name(names.get(e, ""), e)
        first, last = clean_text(first)[:200], clean_text(last)[:200]
        rows.append({"email": e, "first_name": first, "last_name": last,
                     "name_key": name_key(first, last), "title": "", "phone": "",
                     "company_pk": companies.get(domain_of(e)), "fields": {}, "source": "auto",
                     "created_at": now, "updated_at": now})
    stmt = insert(dialect, contacts_table).on_conflict_do_nothing(
        index_elements=[contacts_table.c.email])
    for chunk in chunks(rows):
        await conn.execute(stmt, list(chunk))


async def _make_companies(conn: AsyncConnection, dialect: str, domains: list[str],
                          now: datetime, batch: Sequence[int]) -> None:
    """The companies of `domains` (company domains: not free mail, not ours), named after
    their domain, made for contacts made automatically; the mail stored earlier with an
    address at one of them is linked to it, as an import does."""
    rows = [{"domain": d, "name": d, "owner": None, "created_at": now, "updated_at": now}
            for d in domains]
    stmt = (insert(dialect, companies_table)
            .on_conflict_do_nothing(index_elements=[companies_table.c.domain])
            .returning(companies_table.c.id))
    made: list[int] = []
    for chunk in chunks(rows):
        made += (await conn.execute(stmt, list(chunk))).scalars().all()
    # only those made here: a concurrent writer links its own
    await link_history(conn, dialect, made, exclude=batch)


async def link_history(conn: AsyncConnection, dialect: str, company_pks: Sequence[int], *,
                       exclude: Sequence[int] = ()) -> int:
    """Link the messages already stored with an address at the domain of one of the
    companies `company_pks` (new ones: an import's, or made for an automatic contact) to
    it, but not the messages `exclude` (a batch that links its own). Returns how many
    links were made."""
    linked = 0
    for chunk in chunks(list(company_pks)):
        sel = (sa.select(addresses_table.c.message_pk, companies_table.c.id)
               .join(companies_table, companies_table.c.domain == addresses_table.c.domain)
               .where(companies_table.c.id.in_(chunk)).distinct())
        if exclude:
            sel = sel.where(addresses_table.c.message_pk.not_in(list(exclude)))
        link = insert(dialect, message_companies_table).from_select(
            ["message_pk", "company_pk"], sel)
        result = await conn.execute(link.on_conflict_do_nothing())
        linked += max(result.rowcount or 0, 0)
    return linked


async def list_ambiguous(db: Database, *, after: str | None = None,
                         limit: int = 100) -> list[dict[str, Any]]:
    """Addresses `link_by: name` left unlinked (several contacts have their name) that no
    contact has since, in address order; `after` is a cursor (the last address seen)."""
    t = ambiguities_table.c
    q = (sa.select(ambiguities_table)
         .where(t.address.not_in(sa.select(contacts_table.c.email)),
                t.address.not_in(sa.select(contact_addresses_table.c.address)))
         .order_by(t.address))
    if after:
        q = q.where(t.address > after.strip().lower())
    try:
        async with db.engine.connect() as conn:
            rows = (await conn.execute(q.limit(max(0, limit)))).mappings().all()
    except SQLAlchemyError as exc:
        raise db.error("store read failed", exc) from exc
    return [{"address": r["address"], "name": r["name"], "candidates": list(r["candidates"] or []),
             "messages": r["messages"], "first_seen_at": iso(r["first_seen_at"]),
             "last_seen_at": iso(r["last_seen_at"])} for r in rows]


async def contact_addresses(conn: AsyncConnection, pks: Sequence[int]) -> dict[int, list[str]]:
    """Contact pk -> its further addresses, in the order they were added."""
    out: dict[int, list[str]] = {pk: [] for pk in pks}
    extra = contact_addresses_table.c
    for chunk in chunks(list(pks)):
        rows = await conn.execute(sa.select(extra.contact_pk, extra.address)
                                  .where(extra.contact_pk.in_(chunk))
                                  .order_by(extra.created_at, extra.address))
        for pk, address in rows.all():
            out[pk].append(address)
    return out
