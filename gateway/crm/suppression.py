"""The suppression list: addresses later mail must not reach, added by hard bounces, complaints or hand.

An address lands on the list (table ``suppressions``, one row per lower-cased address,
the first reason kept) when:

- a ``bounced`` event says the address itself is bad: a permanent failure whose status
  is ``5.1.x`` (no such mailbox, bad domain), ``5.2.1`` (mailbox disabled), ``5.4.1``
  (Exchange Online's "recipient address rejected") or ``5.4.4`` (no route to the
  domain), or a delivery report marked ``hard`` without a status. Policy and content
  refusals (``5.7.x``), a full mailbox (``5.2.2``) and expired retries are not the
  address's fault and suppress nothing;
- a ``complained`` event (an RFC 5965 feedback report: the recipient marked it spam);
- an operator adds it (API, CLI): reason ``manual``.

Whether later mail to a listed address is refused is the ``suppressed`` policy key's
decision (``record``, the default: delivered and marked; ``refuse``: ``550 5.1.1`` at
RCPT). :func:`from_events` and :func:`mark_queued` work inside the store's own
transactions (the store calls them); :class:`SuppressionList` is the read/write API the
HTTP API, the CLI and the relay use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.crm.models import SUPPRESSION_REASONS, suppressions_table
from gateway.crm.sql import chunks, clean_opt_text, insert, iso
from gateway.errors import StoreError
from gateway.records import clean_text

#: Enhanced status codes (RFC 3463) that mean the address itself is bad.
_HARD_STATUS = re.compile(r"5\.1\.\d{1,3}|5\.2\.1|5\.4\.1|5\.4\.4")
_STATUS_IN_TEXT = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
#: How long :meth:`SuppressionList.suppressed` trusts what it read (seconds).
CACHE_TTL = 5.0
DETAIL_MAX = 500


class StoreLike(Protocol):
    """What this module needs of :class:`gateway.crm.store.Store` (which imports this module)."""

    engine: AsyncEngine
    dialect: str

    def error(self, what: str, exc: BaseException) -> StoreError: ...


def normalize(address: str) -> str:
    """The list's spelling of an address: stripped of ``<>`` and blanks, lower-cased."""
    return address.strip().strip("<>").strip().lower()


def valid_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and " " not in address and len(address) <= 320
                and "." in domain and not domain.startswith(".") and ".." not in domain)


def bounce_status(details: Mapping[str, Any]) -> str | None:
    """The enhanced status of a bounced event: ``details.status``, else from its reply text."""
    status = details.get("status")
    if isinstance(status, str) and status:
        return status.strip()
    reply = details.get("reply")
    if isinstance(reply, str):
        m = _STATUS_IN_TEXT.search(reply)
        if m:
            return m.group(1)
    return None


def suppression_for(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) when this event row puts its recipient on the list, else None."""
    details: Mapping[str, Any] = event.get("details") or {}
    if event.get("type") == "complained":
        kind = details.get("feedback_type") or "abuse"
        return "complained", f"feedback report: {kind}"
    if event.get("type") != "bounced" or details.get("expired"):
        return None
    status = bounce_status(details)
    if status is not None:
        if not _HARD_STATUS.fullmatch(status):
            return None
    elif details.get("hard") is not True:
        return None
    text = details.get("diagnostic") or details.get("reply") or ""
    detail = f"{status or 'hard bounce'}: {text}" if text else (status or "hard bounce")
    return "bounced", detail[:DETAIL_MAX]


async def from_events(conn: AsyncConnection, dialect: str,
                      rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Add the recipients of hard bounces and complaints among `rows` (event rows just
    inserted, in the caller's transaction); returns the addresses newly listed."""
    now = datetime.now(UTC)
    adds: dict[str, dict[str, Any]] = {}
    for row in rows:
        found = suppression_for(row)
        address = normalize(str(row.get("recipient") or ""))
        if found is None or not address or address in adds:
            continue
        reason, detail = found
        adds[address] = {"address": clean_text(address), "reason": reason,
                         "detail": clean_text(detail), "message_pk": row.get("message_pk"),
                         "created_by": None, "created_at": now}
    if not adds:
        return []
    stmt = (insert(dialect, suppressions_table)
            .on_conflict_do_nothing(index_elements=[suppressions_table.c.address])
            .returning(suppressions_table.c.address))
    added: list[str] = []
    for chunk in chunks(list(adds.values())):
        added += [a for (a,) in (await conn.execute(stmt, list(chunk))).all()]
    return added


async def listed(conn: AsyncConnection, addresses: Iterable[str]) -> dict[str, str]:
    """address -> reason for those of `addresses` on the list (one query per chunk)."""
    wanted = sorted({normalize(a) for a in addresses if a})
    out: dict[str, str] = {}
    for chunk in chunks(wanted):
        rows = await conn.execute(sa.select(suppressions_table.c.address, suppressions_table.c.reason)
                                  .where(suppressions_table.c.address.in_(chunk)))
        out.update({a: r for a, r in rows.all()})
    return out


async def mark_queued(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Mark ``queued`` event rows (about to be inserted) whose recipient is on the list:
    ``details.suppressed`` is the reason. Returns the addresses marked."""
    queued = [r for r in rows if r.get("type") == "queued" and r.get("recipient")]
    if not queued:
        return []
    found = await listed(conn, (r["recipient"] for r in queued))
    marked: list[str] = []
    for r in queued:
        reason = found.get(normalize(r["recipient"]))
        if reason is not None:
            r["details"] = {**(r.get("details") or {}), "suppressed": reason}
            marked.append(r["recipient"])
    return marked


def row_dict(r: Mapping[str, Any] | sa.RowMapping) -> dict[str, Any]:
    """A ``suppressions`` row as the API and the CLI show it."""
    return {"address": r["address"], "reason": r["reason"], "detail": r["detail"] or "",
            "message_id": r["message_pk"], "created_by": r["created_by"],
            "created_at": iso(r["created_at"])}


class SuppressionList:
    """List, add, remove and look up suppressed addresses; a short cache for RCPT-time lookups."""

    def __init__(self, store: StoreLike, *, clock: Callable[[], float] = time.monotonic,
                 ttl: float = CACHE_TTL) -> None:
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self._cache: dict[str, tuple[str, float]] = {}

    async def list(self, *, reason: str | None = None, prefix: str | None = None,
                   after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """In address order; `after` is the last address of the previous page (the cursor)."""
        if reason is not None and reason not in SUPPRESSION_REASONS:
            raise ValueError(f"reason must be one of {', '.join(SUPPRESSION_REASONS)}, not {reason!r}")
        q = sa.select(suppressions_table).order_by(suppressions_table.c.address)
        if reason:
            q = q.where(suppressions_table.c.reason == reason)
        if prefix:
            escaped = normalize(prefix).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(suppressions_table.c.address.like(escaped + "%", escape="\\"))
        if after:
            q = q.where(suppressions_table.c.address > normalize(after))
        try:
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(q.limit(max(0, limit)))).mappings().all()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("store read failed", exc) from exc
        return [row_dict(r) for r in rows]

    async def get(self, address: str) -> dict[str, Any] | None:
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(suppressions_table).where(
                    suppressions_table.c.address == normalize(address)))).mappings().first()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("store read failed", exc) from exc
        return None if row is None else row_dict(row)

    async def add(self, address: str, *, detail: str = "", created_by: str | None = None,
                  ) -> tuple[dict[str, Any], bool]:
        """List `address` by hand; (the row, whether it was added now). An address already on
        the list keeps its first reason. ValueError for something that is no address."""
        a = normalize(address)
        if not valid_address(a):
            raise ValueError(f"{address!r} is not an e-mail address")
        row = {"address": clean_text(a), "reason": "manual",
               "detail": clean_text(detail)[:DETAIL_MAX], "message_pk": None,
               "created_by": clean_opt_text(created_by), "created_at": datetime.now(UTC)}
        stmt = (insert(self.store.dialect, suppressions_table)
                .on_conflict_do_nothing(index_elements=[suppressions_table.c.address])
                .returning(suppressions_table.c.address))
        try:
            async with self.store.engine.begin() as conn:
                created = (await conn.execute(stmt, [row])).first() is not None
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("store write failed", exc) from exc
        self._cache.pop(a, None)
        found = await self.get(a)
        assert found is not None
        return found, created

    async def remove(self, address: str) -> bool:
        """Take `address` off the list; False when it was not on it."""
        a = normalize(address)
        try:
            async with self.store.engine.begin() as conn:
                result = await conn.execute(sa.delete(suppressions_table)
                                            .where(suppressions_table.c.address == a))
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("store write failed", exc) from exc
        self._cache.pop(a, None)
        return bool(result.rowcount)

    async def reason(self, address: str) -> str | None:
        """Why `address` is listed (None: it is not). A listed address is remembered for
        :data:`CACHE_TTL` seconds (a removal on another node takes effect here within that
        time); an address not listed is looked up every time, so a new bounce counts at
        once. StoreError when the store cannot be read."""
        a = normalize(address)
        now = self.clock()
        hit = self._cache.get(a)
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        try:
            async with self.store.engine.connect() as conn:
                found = await listed(conn, [a])
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read the suppression list", exc) from exc
        reason = found.get(a)
        if reason is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[a] = (reason, now)
        return reason
