"""Contacts and companies: CSV import (line-numbered errors), upsert, listing, a contact's timeline.

A contact is known by its lower-cased e-mail address, so importing the same file
twice updates rows and never duplicates them; a non-empty value in the file replaces
the stored one, an empty one keeps it. A company is known by its e-mail domain: the
``domain`` column, else the contact's own domain (never a free-mail domain). A
contact or company that is new gets the messages already stored for its address or
domain linked at once, so importing contacts after mail arrived loses no history.
A contact and a company may have an ``owner``, a user login (checked against
``users:`` by :func:`resolve_owners` and the API): shared mailboxes route mail by it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Config
from gateway.crm.identify import contact_addresses, contact_ids, link_history
from gateway.crm.linking import FREEMAIL_DOMAINS
from gateway.crm.models import (
    addresses_table,
    companies_table,
    contact_addresses_table,
    contacts_table,
    message_contacts_table,
)
from gateway.crm.people import name_key
from gateway.crm.sql import chunks, iso
from gateway.crm.store import Store
from gateway.errors import ConfigError, Problem
from gateway.mail.addresses import domain_of
from gateway.records import clean_text

KNOWN_COLUMNS = ("email", "first_name", "last_name", "name", "company", "domain", "title", "phone",
                 "owner", "company_owner")
_ALIASES = {"e-mail": "email", "email address": "email", "mail": "email",
            "first name": "first_name", "firstname": "first_name", "given name": "first_name",
            "last name": "last_name", "lastname": "last_name", "surname": "last_name",
            "family name": "last_name", "full name": "name", "company name": "company",
            "organization": "company", "organisation": "company", "company_domain": "domain",
            "company domain": "domain", "website": "domain", "job title": "title",
            "phone number": "phone", "telephone": "phone"}
MAX_FIELD = 1000


@dataclass
class ContactInput:
    """One contact to create or update."""

    email: str
    first_name: str = ""
    last_name: str = ""
    company: str = ""
    domain: str = ""
    title: str = ""
    phone: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    line: int | None = None     # where it came from, for messages
    #: user logins (``users:``) owning the contact and its company; empty keeps the stored one
    owner: str = ""
    company_owner: str = ""


@dataclass(frozen=True)
class UpsertResult:
    created: int
    updated: int
    unchanged: int
    companies_created: int
    messages_linked: int


def valid_email(email: str) -> bool:
    local, at, domain = email.rpartition("@")
    return bool(at and local and domain and "." in domain and " " not in email
                and len(email) <= 320 and not domain.startswith(".") and ".." not in domain)


def _column(name: str) -> str:
    key = name.strip().lstrip("\ufeff").strip().lower()
    key = _ALIASES.get(key, key)
    return key.replace(" ", "_").replace("-", "_")


def parse_csv(text: str, source: str = "<csv>") -> list[ContactInput]:
    """Read contacts from CSV text with a header row; ConfigError lists every bad row by line.

    Columns (case-insensitive, common aliases accepted): ``email`` (required),
    ``first_name``, ``last_name`` (or ``name``, split at the last space), ``company``,
    ``domain``, ``title``, ``phone``; any other column is kept in the contact's ``fields``.
    The delimiter (comma, semicolon or tab) is detected.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    sample = text[:4096]
    try:
        dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    problems: list[Problem] = []
    try:
        header = next(reader)
    except StopIteration:
        raise ConfigError([Problem(source, 1, "", "empty file: expected a header row with an "
                                                  "email column")]) from None
    except csv.Error as exc:
        raise ConfigError([Problem(source, 1, "", f"not CSV: {exc}")]) from None
    columns = [_column(h) for h in header]
    if "email" not in columns:
        raise ConfigError([Problem(source, 1, "email", "no email column in the header row "
                                                       f"(columns: {', '.join(header)})")])
    dupes = {c for c in columns if c and columns.count(c) > 1}
    if dupes:
        raise ConfigError([Problem(source, 1, sorted(dupes)[0], "column appears more than once")])
    out: list[ContactInput] = []
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(columns):
                problems.append(Problem(source, line, "", f"{len(row)} cells but the header has "
                                                          f"{len(columns)} columns"))
                continue
            values = {c: clean_text(v.strip())[:MAX_FIELD] for c, v in zip(columns, row, strict=False) if c}
            email = values.get("email", "").strip().strip("<>").lower()
            if not valid_email(email):
                problems.append(Problem(source, line, "email",
                                        f"{values.get('email', '')!r} is not an e-mail address"))
                continue
            if email in seen:
                problems.append(Problem(source, line, "email",
                                        f"{email} already appears on line {seen[email]}"))
                continue
            seen[email] = line
            first, last = values.get("first_name", ""), values.get("last_name", "")
            if not first and not last and values.get("name"):
                first, _, last = values["name"].rpartition(" ")
                if not first:
                    first, last = last, ""
            domain = values.get("domain", "").lower().removeprefix("https://").removeprefix(
                "http://").removeprefix("www.").split("/")[0]
            if domain and ("." not in domain or " " in domain):
                problems.append(Problem(source, line, "domain", f"{domain!r} is not a domain"))
                continue
            extra = {k: v for k, v in values.items() if k not in KNOWN_COLUMNS and v}
            c = ContactInput(email=email, first_name=first, last_name=last,
                             company=values.get("company", ""), domain=domain,
                             title=values.get("title", ""), phone=values.get("phone", ""),
                             fields=extra, line=line, owner=values.get("owner", ""),
                             company_owner=values.get("company_owner", ""))
            if c.company_owner and company_domain_for(c) is None:
                problems.append(Problem(source, line, "company_owner", "needs a company: a domain, "
                                        "or a company name with a company e-mail address"))
                continue
            out.append(c)
    except csv.Error as exc:
        problems.append(Problem(source, reader.line_num, "", f"not CSV: {exc}"))
    if problems:
        raise ConfigError(problems)
    return out


def resolve_owners(contacts: Sequence[ContactInput], cfg: Config, source: str) -> None:
    """Check `owner` and `company_owner` name users under ``users:`` (case-insensitive) and
    spell them as configured; ConfigError lists every unknown login by line (exit 2)."""
    problems: list[Problem] = []
    for c in contacts:
        for key in ("owner", "company_owner"):
            login = getattr(c, key)
            if not login:
                continue
            user = cfg.user(login)
            if user is None:
                problems.append(Problem(source, c.line, key,
                                        f"no user with login {login!r} in users: of {cfg.source}"))
            else:
                setattr(c, key, user.login)
    if problems:
        raise ConfigError(problems)


def read_csv_file(path: Path) -> list[ContactInput]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), None, "", f"cannot read: {exc.strerror or exc}")]) \
            from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", "replace")  # Excel's "CSV" on Windows
    return parse_csv(text, str(path))


def company_domain_for(c: ContactInput) -> str | None:
    if c.domain:
        return c.domain
    if not c.company:
        return None
    d = domain_of(c.email)
    return None if d in FREEMAIL_DOMAINS else d


async def upsert_contacts(store: Store, contacts: Sequence[ContactInput],
                          source: str = "import") -> UpsertResult:
    """Create or update contacts (and their companies) in one transaction; link their history."""
    now = datetime.now(UTC)
    try:
        async with store.engine.begin() as conn:
            companies_created, company_ids = await _upsert_companies(store, conn, contacts, now)
            existing: dict[str, dict[str, Any]] = {}
            emails = [c.email.lower() for c in contacts]
            for chunk in chunks(emails):
                rows = await conn.execute(sa.select(contacts_table).where(contacts_table.c.email.in_(chunk)))
                existing.update({r["email"]: dict(r) for r in rows.mappings()})
            new_rows: list[dict[str, Any]] = []
            changed_rows: list[dict[str, Any]] = []
            unchanged = 0
            for c in contacts:
                email = c.email.lower()
                d = company_domain_for(c)
                company_pk = company_ids.get(d) if d else None
                values = {"first_name": c.first_name, "last_name": c.last_name, "title": c.title,
                          "phone": c.phone, "owner": c.owner or None}
                old = existing.get(email)
                if old is None:
                    new_rows.append({"email": email, **values, "company_pk": company_pk,
                                     "name_key": name_key(c.first_name, c.last_name),
                                     "fields": dict(c.fields), "source": source,
                                     "created_at": now, "updated_at": now})
                    continue
                change: dict[str, Any] = {k: v for k, v in values.items() if v and v != old[k]}
                if "first_name" in change or "last_name" in change:
                    change["name_key"] = name_key(change.get("first_name", old["first_name"]),
                                                  change.get("last_name", old["last_name"]))
                if company_pk is not None and company_pk != old["company_pk"]:
                    change["company_pk"] = company_pk
                fields = {**(old["fields"] or {}), **c.fields}
                if fields != (old["fields"] or {}):
                    change["fields"] = fields
                if not change:
                    unchanged += 1
                    continue
                keep = {k: old[k] for k in (*values, "name_key", "company_pk", "fields")}
                changed_rows.append({**keep, **change, "updated_at": now, "_id": old["id"]})
            if changed_rows:   # one executemany, not a statement per contact
                await conn.execute(sa.update(contacts_table)
                                   .where(contacts_table.c.id == sa.bindparam("_id")), changed_rows)
            linked = 0
            if new_rows:
                stmt = (store.insert(contacts_table)
                        .on_conflict_do_nothing(index_elements=[contacts_table.c.email])
                        .returning(contacts_table.c.id, contacts_table.c.email))
                created_ids: dict[str, int] = {}
                for chunk in chunks(new_rows):
                    result = await conn.execute(stmt, list(chunk))
                    created_ids.update({e: pk for pk, e in result.all()})
                # an address `link_by: name` gave another contact is this new contact's now
                for chunk in chunks(sorted(created_ids)):
                    await conn.execute(sa.delete(contact_addresses_table)
                                       .where(contact_addresses_table.c.address.in_(chunk)))
                linked += await _link_history_contacts(store, conn, created_ids)
            new_domains = {d: pk for d, pk in company_ids.items() if d in companies_created}
            linked += await _link_history_companies(store, conn, new_domains)
    except SQLAlchemyError as exc:
        raise store.error("contact import failed", exc) from exc
    return UpsertResult(created=len(new_rows), updated=len(changed_rows), unchanged=unchanged,
                        companies_created=len(companies_created), messages_linked=linked)


async def _upsert_companies(store: Store, conn: AsyncConnection, contacts: Sequence[ContactInput],
                            now: datetime) -> tuple[set[str], dict[str, int]]:
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for c in contacts:
        d = company_domain_for(c)
        if d:
            names[d] = c.company or names.get(d, "")
            if c.company_owner:
                owners[d] = c.company_owner
    if not names:
        return set(), {}
    ids: dict[str, int] = {}
    existing: dict[str, str] = {}
    for chunk in chunks(sorted(names)):
        rows = await conn.execute(sa.select(companies_table.c.domain, companies_table.c.id,
                                            companies_table.c.name)
                                  .where(companies_table.c.domain.in_(chunk)))
        for d, pk, name in rows.all():
            ids[d] = pk
            existing[d] = name
    for d, name in names.items():
        if d in ids and name and name != existing[d]:
            await conn.execute(sa.update(companies_table).where(companies_table.c.id == ids[d])
                               .values(name=name, updated_at=now))
        if d in ids and d in owners:
            await conn.execute(sa.update(companies_table).where(companies_table.c.id == ids[d])
                               .values(owner=owners[d], updated_at=now))
    missing = [{"domain": d, "name": names[d], "owner": owners.get(d), "created_at": now,
                "updated_at": now} for d in sorted(names) if d not in ids]
    created: set[str] = set()
    if missing:
        stmt = (store.insert(companies_table)
                .on_conflict_do_nothing(index_elements=[companies_table.c.domain])
                .returning(companies_table.c.id, companies_table.c.domain))
        for chunk in chunks(missing):
            result = await conn.execute(stmt, list(chunk))
            for pk, d in result.all():
                ids[d] = pk
                created.add(d)
        for chunk in chunks([m["domain"] for m in missing if m["domain"] not in ids]):
            found = await conn.execute(sa.select(companies_table.c.domain, companies_table.c.id)
                                       .where(companies_table.c.domain.in_(chunk)))
            ids.update({d: pk for d, pk in found.all()})
    return created, ids


async def _link_history_contacts(store: Store, conn: AsyncConnection, ids: dict[str, int]) -> int:
    """Link already stored messages to newly created contacts (their own address, not excluded)."""
    if not store.rules.links_contacts:
        return 0
    linked = 0
    pks = [pk for email, pk in ids.items() if store.rules.linkable(email)]
    for chunk in chunks(pks):
        sel = (sa.select(addresses_table.c.message_pk, contacts_table.c.id, addresses_table.c.role)
               .join(contacts_table, contacts_table.c.email == addresses_table.c.address)
               .where(contacts_table.c.id.in_(chunk)))
        stmt = store.insert(message_contacts_table).from_select(["message_pk", "contact_pk", "role"], sel)
        result = await conn.execute(stmt.on_conflict_do_nothing())
        linked += max(result.rowcount or 0, 0)
    return linked


async def _link_history_companies(store: Store, conn: AsyncConnection, ids: dict[str, int]) -> int:
    """Link already stored messages to newly created companies by the domain of an address."""
    if not store.rules.link_by_domain:
        return 0
    pks = [pk for domain, pk in ids.items()
           if domain not in FREEMAIL_DOMAINS and domain not in store.rules.own_domains]
    return await link_history(conn, store.dialect, pks)


def _contact_dict(r: Any, extra: list[str]) -> dict[str, Any]:
    return {"email": r["email"], "emails": [r["email"], *extra], "first_name": r["first_name"],
            "last_name": r["last_name"],
            "name": f"{r['first_name']} {r['last_name']}".strip(), "title": r["title"],
            "phone": r["phone"], "company": r["company_name"] or "",
            "company_domain": r["company_domain"], "fields": r["fields"] or {},
            "source": r["source"], "created_at": iso(r["created_at"]),
            "updated_at": iso(r["updated_at"]), "owner": r["owner"],
            "company_owner": r["company_owner"]}


def _contact_select() -> sa.Select[Any]:
    return (sa.select(contacts_table, companies_table.c.name.label("company_name"),
                      companies_table.c.domain.label("company_domain"),
                      companies_table.c.owner.label("company_owner"))
            .outerjoin(companies_table, companies_table.c.id == contacts_table.c.company_pk))


async def list_contacts(store: Store, *, search: str | None = None, after: str | None = None,
                        limit: int = 100) -> list[dict[str, Any]]:
    """Contacts in e-mail order; `search` matches e-mail, name or company; `after` is a cursor."""
    q = _contact_select().order_by(contacts_table.c.email)
    if search:
        like = f"%{search.lower()}%"
        q = q.where(sa.or_(contacts_table.c.email.like(like),
                           sa.func.lower(contacts_table.c.first_name + " " + contacts_table.c.last_name)
                           .like(like), sa.func.lower(companies_table.c.name).like(like)))
    if after:
        q = q.where(contacts_table.c.email > after.lower())
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(q.limit(max(0, limit)))).mappings().all()
            extra = await contact_addresses(conn, [r["id"] for r in rows])
    except SQLAlchemyError as exc:
        raise store.error("store read failed", exc) from exc
    return [_contact_dict(r, extra[r["id"]]) for r in rows]


async def get_contact(store: Store, email: str) -> dict[str, Any] | None:
    """The contact with this address, its own or one of its further ones (``emails``)."""
    addr = email.strip().lower()
    try:
        async with store.engine.connect() as conn:
            pk = (await contact_ids(conn, [addr])).get(addr)
            row = None if pk is None else (await conn.execute(_contact_select().where(
                contacts_table.c.id == pk))).mappings().first()
            extra = await contact_addresses(conn, [pk]) if row is not None and pk else {}
    except SQLAlchemyError as exc:
        raise store.error("store read failed", exc) from exc
    return _contact_dict(row, extra[row["id"]]) if row is not None else None


async def contact_timeline(store: Store, email: str, *, before: tuple[datetime, int] | None = None,
                           limit: int = 50) -> list[dict[str, Any]]:
    """The messages from, to or copying an address, newest first: for a contact's address,
    those of all its addresses (``emails``)."""
    addr = email.strip().lower()
    contact = await get_contact(store, addr)
    addrs = contact["emails"] if contact is not None else [addr]
    with_address = (sa.select(addresses_table.c.message_pk)
                    .where(addresses_table.c.address.in_(addrs)))
    return await store.timeline(with_address, before=before, limit=limit)


async def set_company_owner(store: Store, domain: str, owner: str | None) -> dict[str, Any] | None:
    """Set (or, with None, clear) the owner of the company at `domain`; the company as
    ``{"domain", "name", "owner"}``, None when there is no such company."""
    d = domain.strip().lower()
    try:
        async with store.engine.begin() as conn:
            row = (await conn.execute(
                sa.update(companies_table).where(companies_table.c.domain == d)
                .values(owner=owner, updated_at=datetime.now(UTC))
                .returning(companies_table.c.domain, companies_table.c.name,
                           companies_table.c.owner))).first()
    except SQLAlchemyError as exc:
        raise store.error("store write failed", exc) from exc
    return {"domain": row[0], "name": row[1], "owner": row[2]} if row is not None else None
