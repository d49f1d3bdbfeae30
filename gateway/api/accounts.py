"""Connected mailboxes as the API shows them: the configured accounts joined with their runtime state.

The ``accounts`` table holds what the IMAP side learns at run time (status, reason,
last sync); an account configured but never synced has no row yet and shows as
``active`` with ``last_sync_at: null``. A row whose account is no longer configured is
still listed, with ``configured: false``, so its history stays visible.
"""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Config
from gateway.crm.models import AccountState
from gateway.crm.store import Store, _iso

_accounts = cast(sa.Table, AccountState.__table__)


async def list_accounts(store: Store, cfg: Config) -> list[dict[str, Any]]:
    """Configured accounts in config order, then unconfigured ones with state, by id."""
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(
                _accounts.c.id, _accounts.c.email, _accounts.c.status, _accounts.c.status_reason,
                _accounts.c.status_at, _accounts.c.last_sync_at).order_by(_accounts.c.id))
            ).mappings().all()
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail("store read failed", exc) from exc
    state = {r["id"]: r for r in rows}
    out: list[dict[str, Any]] = []
    for a in cfg.accounts:
        s = state.pop(a.id, None)
        out.append({
            "id": a.id, "email": a.email, "provider": a.provider, "configured": True,
            "sync": {"enabled": a.sync.enabled, "direction": a.sync.direction,
                     "folders": list(a.sync.folders)},
            "status": s["status"] if s else "active",
            "status_reason": s["status_reason"] if s else None,
            "status_at": _iso(s["status_at"]) if s else None,
            "last_sync_at": _iso(s["last_sync_at"]) if s else None})
    for s in state.values():
        out.append({"id": s["id"], "email": s["email"], "provider": None, "configured": False,
                    "sync": None, "status": s["status"], "status_reason": s["status_reason"],
                    "status_at": _iso(s["status_at"]), "last_sync_at": _iso(s["last_sync_at"])})
    return out
