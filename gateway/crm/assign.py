"""Shared mailboxes: the rep each inbound message of a ``shared: true`` account is assigned to.

The store calls :func:`assign_messages` inside the transaction that stores the messages
(after their contacts and companies are linked), for every message newly seen in a
shared account's mailbox. The rules, first match wins:

1. ``contact_owner``: the owner of the contact the sender is linked to;
2. ``company_owner``: the owner of that contact's company, else of the company the
   sender's domain is linked to;
3. ``sticky``: (``assign.fallback: round_robin``) the rep the round robin gave this
   contact before in this account (``contact_assignments``), while still in ``users``;
4. ``round_robin``: the next of ``assign.users``; the position is a row per account in
   ``assignment_cursors``, advanced with one ``UPDATE ... RETURNING`` per batch (a row lock
   on PostgreSQL, the write lock on SQLite), so it survives restarts and several nodes
   never hand out the same turn; the pick is recorded for the contact (sticky from then on);
5. else (``fallback: none``, or nobody to pick) the message stays unassigned.

A message is assigned once: mail already assigned (seen again in another mailbox) keeps
its rep. Nothing here reads the configuration: :class:`SharedPolicy` values come from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import (
    addresses_table,
    assignment_cursors_table,
    companies_table,
    contact_assignments_table,
    contacts_table,
    message_companies_table,
    message_contacts_table,
    messages_table,
)
from gateway.crm.sql import chunks, insert

if TYPE_CHECKING:
    from gateway.config import Config

#: the rules that assign a message, as ``assigned_rule`` and the webhook's ``rule`` say them
RULES: tuple[str, ...] = ("contact_owner", "company_owner", "sticky", "round_robin")


@dataclass(frozen=True)
class SharedPolicy:
    """A shared account's assignment settings (`shared: true`, `assign:`)."""

    account: str
    fallback: str = "none"                 # round_robin | none
    users: tuple[str, ...] = ()


def policies_from_config(cfg: Config) -> tuple[SharedPolicy, ...]:
    """The policies of the accounts in force marked ``shared: true`` (logins spelled as
    under ``users:``, so ``assigned_to`` compares exactly)."""
    def login(name: str) -> str:
        u = cfg.user(name)
        return u.login if u is not None else name

    return tuple(SharedPolicy(a.id, a.assign.fallback, tuple(login(u) for u in a.assign.users))
                 for a in cfg.accounts if a.shared)


@dataclass(frozen=True)
class Assignment:
    """The rep a message went to, and why (`user` None: left unassigned)."""

    message_pk: int
    account: str
    user: str | None
    rule: str | None
    contact: str | None


@dataclass
class _Pick:
    """A round-robin turn still to be resolved (its account's n-th pick of this batch)."""

    account: str
    n: int


async def assign_messages(conn: AsyncConnection, dialect: str,
                          policies: Mapping[str, SharedPolicy],
                          candidates: Sequence[tuple[int, str]], now: datetime) -> list[Assignment]:
    """Assign `candidates` ((message pk, shared account id), in order), in the caller's
    transaction; returns what was decided for each inbound, not yet assigned one."""
    wanted: dict[int, str] = {}
    for pk, account in candidates:
        if account in policies:
            wanted.setdefault(pk, account)
    if not wanted:
        return []
    m_ = messages_table.c
    open_pks: list[int] = []
    for chunk in chunks(sorted(wanted)):
        rows = await conn.execute(sa.select(m_.id).where(
            m_.id.in_(chunk), m_.direction == "inbound", m_.assigned_to.is_(None)))
        open_pks += [pk for (pk,) in rows.all()]
    if not open_pks:
        return []
    senders = await _senders(conn, open_pks)
    # the cursor rows first: a concurrent writer for the same account waits here until this
    # transaction ends, so the sticky picks read next include everything it recorded
    await _lock(conn, dialect, sorted({wanted[pk] for pk in open_pks
                                       if policies[wanted[pk]].fallback == "round_robin"}), now)
    sticky = await _sticky(conn, {(wanted[pk], s[0]) for pk, s in senders.items() if s[0]})

    decided: dict[int, tuple[str | None, str | None] | _Pick] = {}
    picks: dict[str, int] = {}
    pending: dict[tuple[str, int], _Pick] = {}       # contacts picked for earlier in this batch
    for pk in sorted(open_pks):
        account, policy = wanted[pk], policies[wanted[pk]]
        contact_pk, _, owner, company_owner = senders.get(pk, (None, None, None, None))
        if owner:
            decided[pk] = (owner, "contact_owner")
            continue
        if company_owner:
            decided[pk] = (company_owner, "company_owner")
            continue
        if policy.fallback != "round_robin" or not policy.users:
            decided[pk] = (None, None)
            continue
        users = {u.lower() for u in policy.users}
        if contact_pk is not None:
            key = (account, contact_pk)
            if key in pending:
                decided[pk] = pending[key]
                continue
            before = sticky.get(key)
            if before is not None and before.lower() in users:
                decided[pk] = (before, "sticky")
                continue
        pick = _Pick(account, picks.get(account, 0))
        picks[account] = pick.n + 1
        decided[pk] = pick
        if contact_pk is not None:
            pending[(account, contact_pk)] = pick

    turns = await _advance(conn, dialect, picks, now)
    out: list[Assignment] = []
    updates: list[dict[str, object]] = []
    remember: dict[tuple[str, int], str] = {}
    first_pick: dict[tuple[str, int], int] = {}
    for pk in sorted(open_pks):
        d = decided[pk]
        account = wanted[pk]
        contact_pk, email = senders.get(pk, (None, None, None, None))[:2]
        if isinstance(d, _Pick):
            turn_of = policies[d.account].users
            user: str | None = turn_of[(turns[d.account] + d.n) % len(turn_of)]
            rule: str | None = "round_robin"
            if contact_pk is not None:
                ck = (account, contact_pk)
                if ck in first_pick and first_pick[ck] != pk:
                    rule = "sticky"              # the contact's second message of this batch
                else:
                    first_pick[ck] = pk
                    remember[ck] = user or ""
        else:
            user, rule = d
        out.append(Assignment(pk, account, user, rule, email))
        if user:
            updates.append({"_id": pk, "assigned_to": user, "assigned_rule": rule})
    if updates:
        await conn.execute(sa.update(messages_table).where(m_.id == sa.bindparam("_id"))
                           .values(assigned_to=sa.bindparam("assigned_to"),
                                   assigned_rule=sa.bindparam("assigned_rule")), updates)
    await _remember(conn, dialect, remember, now)
    return out


async def _senders(conn: AsyncConnection, pks: Sequence[int]
                   ) -> dict[int, tuple[int | None, str | None, str | None, str | None]]:
    """Per message: its sender's contact (pk, e-mail), the contact's owner and the owner of
    the contact's company, else of the company its sender's domain is linked to."""
    c, co, mc = contacts_table.c, companies_table, message_contacts_table.c
    out: dict[int, tuple[int | None, str | None, str | None, str | None]] = {}
    for chunk in chunks(pks):
        rows = await conn.execute(
            sa.select(mc.message_pk, c.id, c.email, c.owner, co.c.owner)
            .join(contacts_table, c.id == mc.contact_pk)
            .outerjoin(co, co.c.id == c.company_pk)
            .where(mc.message_pk.in_(chunk), mc.role == "from"))
        for pk, cpk, email, owner, company_owner in rows.all():
            out[pk] = (cpk, email, owner, company_owner)
        # the company of the sender's domain, for senders whose contact has none (or no contact)
        a, mco = addresses_table.c, message_companies_table.c
        by_domain = await conn.execute(
            sa.select(mco.message_pk, co.c.owner)
            .join(co, co.c.id == mco.company_pk)
            .join(addresses_table, sa.and_(a.message_pk == mco.message_pk, a.role == "from",
                                           a.domain == co.c.domain))
            .where(mco.message_pk.in_(chunk), co.c.owner.is_not(None)))
        for pk, owner in by_domain.all():
            cpk, email, contact_owner, company_owner = out.get(pk, (None, None, None, None))
            if not company_owner:
                out[pk] = (cpk, email, contact_owner, owner)
    return out


async def _sticky(conn: AsyncConnection, keys: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The rep each (account, contact) was given by round robin before."""
    t = contact_assignments_table.c
    out: dict[tuple[str, int], str] = {}
    for account in sorted({a for a, _ in keys}):
        contacts = sorted(c for a, c in keys if a == account)
        for chunk in chunks(contacts):
            rows = await conn.execute(sa.select(t.contact_pk, t.user)
                                      .where(t.account == account, t.contact_pk.in_(chunk)))
            out.update({(account, cpk): user for cpk, user in rows.all()})
    return out


async def _lock(conn: AsyncConnection, dialect: str, accounts: Sequence[str],
                now: datetime) -> None:
    """Make (if new) and lock the round-robin cursor row of each account, in id order."""
    t = assignment_cursors_table.c
    for account in accounts:
        await conn.execute(insert(dialect, assignment_cursors_table)
                           .values(account=account, position=0, updated_at=now)
                           .on_conflict_do_nothing(index_elements=[t.account]))
        await conn.execute(sa.update(assignment_cursors_table).where(t.account == account)
                           .values(updated_at=now))


async def _advance(conn: AsyncConnection, dialect: str, picks: Mapping[str, int],
                   now: datetime) -> dict[str, int]:
    """Take `picks[account]` round-robin turns per account (their cursor rows are locked by
    :func:`_lock`); returns each account's first turn (the position before)."""
    t = assignment_cursors_table.c
    first: dict[str, int] = {}
    for account, n in sorted(picks.items()):
        after = (await conn.execute(
            sa.update(assignment_cursors_table).where(t.account == account)
            .values(position=t.position + n, updated_at=now).returning(t.position))).scalar_one()
        first[account] = int(after) - n
    return first


async def _remember(conn: AsyncConnection, dialect: str, picked: Mapping[tuple[str, int], str],
                    now: datetime) -> None:
    """Record round-robin picks per (account, contact), replacing a pick whose rep left."""
    if not picked:
        return
    t = contact_assignments_table.c
    rows = [{"account": a, "contact_pk": c, "user": u, "at": now} for (a, c), u in sorted(picked.items())]
    stmt = insert(dialect, contact_assignments_table)
    stmt = stmt.on_conflict_do_update(index_elements=[t.account, t.contact_pk],
                                      set_={"user": stmt.excluded.user, "at": stmt.excluded.at})
    for chunk in chunks(rows):
        await conn.execute(stmt, list(chunk))
