"""The CRM's JSON views: stored rows as the read API and the webhooks show them.

Pure functions over rows already read (nothing here queries): a message with its
events, sources, contacts and companies, where its raw bytes are served, and in the
detail view its tracking summary
(:func:`message_dict`; ``message.stored`` carries the detail view, the same JSON as
``GET /api/v1/messages/{id}``), one event (:func:`event_payload`), and the message as the
event webhooks carry it (:func:`brief_message`).
Times are ISO 8601 in UTC (:func:`gateway.crm.sql.iso`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gateway.crm.sql import iso
from gateway.crm.summary import summarize


def event_payload(e: Mapping[str, Any] | sa.RowMapping) -> dict[str, Any]:
    """An ``events`` row as the API and webhooks show it."""
    details = e["details"] or {}
    category = None
    if e["type"] in ("opened", "clicked"):   # hits recorded before categories: by the flag
        category = details.get("category") or ("machine" if e["machine"] else "human")
    return {"type": e["type"], "at": iso(e["at"]), "recipient": e["recipient"],
            "machine": bool(e["machine"]), "category": category, "details": details}


def brief_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message's list JSON (:func:`message_dict` without bodies) as the event webhooks
    carry it: without ``events`` (the event announced is beside it, and a message with
    thousands of hits would repeat them all in each)."""
    return {k: v for k, v in message.items() if k != "events"}


#: why a message has no raw bytes to serve (``raw.reason`` in its JSON)
RAW_NOT_KEPT = "not kept: store.raw was none when the message was stored"


def raw_info(m: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the original bytes of a ``messages`` row were kept, and where the API serves them."""
    if not m["raw_sha256"]:
        return {"kept": False, "size": None, "sha256": None, "url": None, "reason": RAW_NOT_KEPT}
    return {"kept": True, "size": m["size"], "sha256": m["raw_sha256"],
            "url": f"/api/v1/messages/{m['id']}/raw", "reason": None}


def attachments_with_urls(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's attachments, each with ``url`` (its bytes at
    ``/api/v1/messages/ID/attachments/N``, N its index here; null without raw bytes)."""
    kept = bool(m["raw_sha256"])
    return [{**a, "url": f"/api/v1/messages/{m['id']}/attachments/{n}" if kept else None}
            for n, a in enumerate(m["attachments"] or [])]


def message_dict(m: Mapping[str, Any], events: list[dict[str, Any]], sources: list[dict[str, Any]],
                 contacts: list[dict[str, Any]], companies: list[dict[str, Any]], *,
                 bodies: bool) -> dict[str, Any]:
    """A ``messages`` row with its events, sources, contacts and companies, as the read API
    shows it (README "Read API, metrics and webhooks"), and whether its raw bytes were kept
    (:func:`raw_info`); `bodies` adds the bodies, attachments and every path the message
    was seen on, and its ``tracking`` summary (:func:`gateway.crm.summary.summarize`)."""
    relay = [s["ref"] for s in sources if s["source"] == "relay"]
    out = {
        "id": m["id"], "message_id": m["message_id"], "thread_id": m["thread_id"],
        "direction": m["direction"], "account": m["account"], "user": m["user"],
        "from": m["from_addr"], "to": list(m["to_addrs"] or []), "cc": list(m["cc_addrs"] or []),
        "bcc": list(m["bcc_addrs"] or []),   # the relay's envelope recipients not in To/Cc
        "subject": m["subject"], "date": iso(m["date"]), "snippet": m["snippet"],
        "size": m["size"], "sources": list(dict.fromkeys(s["source"] for s in sources)),
        "queue_id": relay[0] if relay else None,
        "contacts": contacts, "companies": companies, "raw": raw_info(m),
        "events": events,
        # shared mailboxes: the rep it is assigned to and the rule that chose them
        "assigned_to": m["assigned_to"], "assigned_rule": m["assigned_rule"],
    }
    if bodies:
        out["from_name"] = m["from_name"]
        out["in_reply_to"] = m["in_reply_to"]
        out["references"] = list(m["reference_ids"] or [])
        out["text_body"] = m["text_body"]
        out["html_body"] = m["html_body"]
        out["attachments"] = attachments_with_urls(m)
        out["template"] = m["template"]
        out["campaign"] = m["campaign"]
        out["scheduled_at"] = iso(m["scheduled_at"])
        out["seen"] = [{k: (iso(v) if isinstance(v, datetime) else v) for k, v in s.items()
                        if k not in ("id", "message_pk") and v is not None} for s in sources]
        out["tracking"] = summarize(events)
    return out
