"""The read API's OpenAPI 3.1 document, as data (served at ``/api/v1/openapi.json``).

Schemas are JSON Schema 2020-12 (OpenAPI 3.1), so tests validate every route's real
response against them with ``jsonschema``. Keep this in step with gateway.api.http.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.crm.models import (
    ACCOUNT_STATUSES,
    ADDRESS_ROLES,
    DIRECTIONS,
    EVENT_TYPES,
    SOURCES,
    SUPPRESSION_REASONS,
)

MAX_LIMIT = 200
DEFAULT_LIMIT = 50


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(t: str, **kw: Any) -> dict[str, Any]:
    return {"type": [t, "null"], **kw}


_STR: dict[str, Any] = {"type": "string"}
_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
_TIME_OR_NULL: dict[str, Any] = _nullable("string", format="date-time")
_STRS: dict[str, Any] = {"type": "array", "items": _STR}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": extra}


_SUMMARY_PROPS: dict[str, Any] = {
    "id": {"type": "integer"},
    "message_id": _STR,
    "thread_id": _nullable("string"),
    "direction": {"enum": list(DIRECTIONS)},
    "account": _nullable("string"),
    "user": _nullable("string"),
    "from": _STR,
    "to": _STRS,
    "cc": _STRS,
    "bcc": {**_STRS, "description": "relayed mail: the envelope recipients not in To or Cc "
                                    "(never in what was delivered); [] otherwise"},
    "subject": _STR,
    "date": _TIME_OR_NULL,
    "snippet": _STR,
    "size": {"type": "integer"},
    "sources": {"type": "array", "items": {"enum": list(SOURCES)}},
    "queue_id": _nullable("string", description="the first relay copy's queue id"),
    "contacts": {"type": "array", "items": _ref("ContactLink")},
    "companies": {"type": "array", "items": _ref("CompanyLink"),
                  "description": "the companies linked by the domains of its addresses"},
    "raw": _ref("RawInfo"),
    "events": {"type": "array", "items": _ref("Event")},
    "assigned_to": _nullable("string", description="shared mailboxes: the user login the "
                             "message is assigned to"),
    "assigned_rule": {"enum": ["contact_owner", "company_owner", "sticky", "round_robin", None],
                      "description": "the rule that chose `assigned_to`"},
}
_N: dict[str, Any] = {"type": "integer", "minimum": 0}
_BY_CATEGORY: dict[str, Any] = {"type": "object", "additionalProperties": _N,
                                "description": "machine hits per category (proxy, prefetch, "
                                               "scanner, sender, timing, ...)"}
_TRACKING_PROPS: dict[str, Any] = {
    "opens": {**_N, "description": "every opened event"},
    "unique_opens": {**_N, "description": "recipients with an opened event (1 or 0 per recipient)"},
    "human_opens": _N,
    "proxied_opens": {**_N, "description": "opens through Gmail's or Yahoo's image proxy"},
    "machine_opens": {**_N, "description": "machine opens, proxied ones excluded"},
    "machine_opens_by_category": _BY_CATEGORY,
    "clicks": _N, "human_clicks": _N, "machine_clicks": _N,
    "machine_clicks_by_category": _BY_CATEGORY,
    "links": {"type": "object", "description": "per clicked URL (the honeypot left out)",
              "additionalProperties": _obj({"clicks": _N, "human_clicks": _N})},
    "first_activity": _nullable("string", format="date-time",
                                description="first human or proxied open, or human click"),
    "last_activity": _nullable("string", format="date-time"),
    "opened": {"type": "boolean", "description": "a person opened it: a human or proxied open, "
                                                 "or a human click where no pixel loaded"},
}
_DETAIL_PROPS: dict[str, Any] = {
    **_SUMMARY_PROPS,
    "from_name": _STR,
    "in_reply_to": _nullable("string"),
    "references": _STRS,
    "text_body": _STR,
    "html_body": _STR,
    "attachments": {"type": "array", "items": _ref("Attachment")},
    "template": _nullable("string", description="X-Mailgw-Template"),
    "campaign": _nullable("string", description="X-Mailgw-Campaign"),
    "scheduled_at": _nullable("string", format="date-time",
                              description="X-Mailgw-Send-At: when a scheduled send is due"),
    "seen": {"type": "array", "items": {"type": "object", "properties": {
        "source": {"enum": list(SOURCES)}, "ref": _STR, "at": _TIME}, "required": ["source", "ref"]},
        "description": "every path the message was seen on"},
    "tracking": _ref("TrackingSummary"),
}
_COUNT = {"type": "integer", "minimum": 0}
_RATE = _nullable("number", minimum=0, description="null when the denominator is 0")
_ENGAGEMENT_ROW = _obj({
    "group": _STR, "sent": _COUNT, "delivered": _COUNT, "bounced": _COUNT, "opened": _COUNT,
    "clicked": _COUNT, "replied": _COUNT, "auto_replied": _COUNT, "proxied_opens": _COUNT,
    "machine_opens": _COUNT, "machine_clicks": _COUNT,
    "delivery_rate": _RATE, "bounce_rate": _RATE, "open_rate": _RATE, "click_rate": _RATE,
    "reply_rate": _RATE})

_COMPANY_PROPS: dict[str, Any] = {
    "domain": _STR, "name": _STR,
    "owner": _nullable("string", description="the user login owning the company (shared "
                       "mailboxes assign mail from its people who have no owner to them); "
                       "PUT /api/v1/companies/{domain}/owner sets it"),
    "contact_count": _COUNT, "message_count": {**_COUNT, "description": "messages linked to it"},
    "last_activity": _nullable("string", format="date-time",
                               description="the newest linked message (Date, else when stored)"),
    "created_at": _TIME_OR_NULL, "updated_at": _TIME_OR_NULL,
}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR, "parameter": _STR,
                   "problems": {"type": "array", "description": "account routes: every problem",
                                "items": _obj({"parameter": _STR, "message": _STR})}},
                  required=["error"]),
    "Event": _obj({"type": {"enum": list(EVENT_TYPES)}, "at": _TIME, "recipient": _STR,
                   "machine": {"type": "boolean"},
                   "category": {"type": ["string", "null"], "description":
                                "opens and clicks: human, proxied, or the machine's kind (proxy, "
                                "scanner, prefetch, sender, timing, burst, ...); null for other "
                                "events"},
                   "details": {"type": "object", "description": "URL, user agent, SMTP reply, DSN "
                               "status and diagnostic, ...; for hits also `category` and `reason`"}}),
    "TrackingTotals": _obj({**_TRACKING_PROPS, "recipients_opened": {
        **_N, "description": "recipients who opened (the people rule)"}}),
    "TrackingRecipient": _obj({"recipient": _STR, **_TRACKING_PROPS}),
    "TrackingSummary": _obj({
        "total": _ref("TrackingTotals"),
        "recipients": {"type": "array", "items": _ref("TrackingRecipient"),
                       "description": "every recipient with an event, in address order"}}),
    "ContactLink": _obj({"email": _STR, "name": _STR, "role": {"enum": list(ADDRESS_ROLES)}}),
    "CompanyLink": _obj({"domain": _STR, "name": _STR}),
    "RawInfo": _obj({
        "kept": {"type": "boolean", "description": "the original bytes were kept (store.raw "
                 "disk or database when the message was stored)"},
        "size": _nullable("integer"), "sha256": _nullable("string"),
        "url": _nullable("string", description="where GET serves them (message/rfc822)"),
        "reason": _nullable("string", description="why not kept")}),
    "Attachment": _obj({
        "filename": _STR, "content_type": _STR,
        "size": {"type": "integer", "description": "decoded bytes"},
        "sha256": _STR, "content_id": _nullable("string"), "inline": {"type": "boolean"},
        "url": _nullable("string", description="GET serves the decoded part here; null "
                         "when the raw bytes were not kept")},
        required=["filename", "content_type", "size", "sha256", "url"], extra=True),
    "MessageSummary": _obj(_SUMMARY_PROPS),
    "MessageDetail": _obj(_DETAIL_PROPS),
    "MessagePage": _obj({"messages": {"type": "array", "items": _ref("MessageSummary")},
                         "next_cursor": _nullable("string", description="pass as ?cursor= for "
                                                  "the next page; null on the last page")}),
    "Ambiguous": _obj({"address": _STR, "name": _STR,
                       "candidates": {**_STRS, "description": "the contacts with that name"},
                       "messages": _COUNT, "first_seen_at": _TIME, "last_seen_at": _TIME}),
    "AmbiguousList": _obj({"ambiguous": {"type": "array", "items": _ref("Ambiguous")},
                           "next_cursor": _nullable("string")}),
    "Contact": _obj({"email": _STR,
                     "emails": {**_STRS, "description": "its own address first, then those "
                                                        "linked by name"},
                     "first_name": _STR, "last_name": _STR, "name": _STR,
                     "title": _STR, "phone": _STR, "company": _STR,
                     "company_domain": _nullable("string"), "fields": {"type": "object"},
                     "source": _STR, "created_at": _TIME_OR_NULL, "updated_at": _TIME_OR_NULL,
                     "owner": _nullable("string", description="the user login owning the contact"),
                     "company_owner": _nullable("string", description="the user login owning "
                                                "its company")}),
    "CompanyOwner": _obj({"domain": _STR, "name": _STR, "owner": _nullable("string")}),
    "CompanyOwnerInput": {"type": "object", "required": ["owner"], "additionalProperties": False,
                          "properties": {"owner": {"type": ["string", "null"], "description":
                                                   "a login under users:, or null to clear"}}},
    "Timeline": _obj({"email": _STR, "contact": {"oneOf": [_ref("Contact"), {"type": "null"}]},
                      "messages": {"type": "array", "items": _ref("MessageSummary")},
                      "next_cursor": _nullable("string")}),
    "SyncRun": _obj({"id": {"type": "integer"}, "folder": _STR, "kind": _STR,
                     "status": {"enum": ["running", "ok", "error"]}, "started_at": _TIME_OR_NULL,
                     "finished_at": _TIME_OR_NULL, "seconds": _nullable("number"),
                     "fetched": _COUNT, "stored": _COUNT, "skipped": _COUNT,
                     "error": _nullable("string")}),
    "Account": _obj({
        "id": _STR, "email": _STR,
        "configured": {"type": "boolean", "description": "declared in gateway.yaml"},
        "origin": {"enum": ["config", "runtime"],
                   "description": "config: declared in gateway.yaml (change it there); runtime: "
                                  "created through the API, the CLI or a connect link"},
        "provider": _nullable("string"),
        "auth_method": {"enum": ["password", "oauth2", "service", "delegate", None]},
        "oauth_provider": _nullable("string"), "service_account": _nullable("string"),
        "send_as": {**_STRS, "description": "submission users who send as this account"},
        "connected_email": _nullable("string", description="the address the OAuth provider "
                                                           "vouched for when it was connected"),
        "connected_at": _TIME_OR_NULL,
        "direction": {"enum": ["two-way", "one-way", None]}, "enabled": _nullable("boolean"),
        "folders": _STRS, "history_days": _nullable("integer"),
        "status": {"enum": list(ACCOUNT_STATUSES)}, "reason": _nullable("string"),
        "status_at": _TIME_OR_NULL, "last_sync_at": _TIME_OR_NULL,
        "lease_owner": _nullable("string"), "lease_expires_at": _TIME_OR_NULL,
        "messages": _COUNT,
        "last_run": {"oneOf": [{"type": "null"}, _ref("SyncRun")]},
        "shared": {"type": "boolean", "description": "a team mailbox: inbound mail is assigned "
                                                     "to reps"},
        "assign": {"oneOf": [{"type": "null"}, _obj({
            "fallback": {"enum": ["round_robin", "none"]}, "users": _STRS})]},
        "today": _ref("DailyFigures")}),
    "DailyFigures": _obj({
        "date": {"type": "string", "format": "date", "description": "today, UTC"},
        "synced": {**_COUNT, "description": "messages the sync stored or saw in the mailbox today"},
        "linked": {**_COUNT, "description": "of those, linked to at least one contact"},
        "sent": {**_COUNT, "description": "outbound messages of the account dated today"},
        "received": {**_COUNT, "description": "inbound messages of the account dated today"}}),
    "SyncStatus": {"type": "object", "description": "`mailgw sync status ID --json`: the Account "
                   "fields, plus `folders_synced` (per folder its checkpoint: uidvalidity, last_uid, "
                   "highestmodseq, initial_done; last sync, stored messages, last run), `totals`, "
                   "`recent_runs` and `recent_errors` (SyncRun objects), `today` (DailyFigures)",
                   "required": ["id", "status", "folders_synced", "totals", "recent_runs", "today"],
                   "properties": {"today": _ref("DailyFigures")}},
    "Suppression": _obj({"address": _STR, "reason": {"enum": list(SUPPRESSION_REASONS)},
                         "detail": _STR,
                         "message_id": _nullable("integer", description="the message whose "
                                                 "bounce or complaint listed the address"),
                         "created_by": _nullable("string"), "created_at": _TIME}),
    "SuppressionList": _obj({"suppressions": {"type": "array", "items": _ref("Suppression")},
                             "next_cursor": _nullable("string")}),
    "SuppressionInput": {"type": "object", "required": ["address"], "additionalProperties": False,
                         "properties": {"address": {"type": "string", "format": "email"},
                                        "detail": {"type": "string", "maxLength": 500}}},
    "ContactList": _obj({"contacts": {"type": "array", "items": _ref("Contact")},
                         "next_cursor": _nullable("string")}),
    "Company": _obj(_COMPANY_PROPS),
    "CompanyDetail": _obj({**_COMPANY_PROPS, "contacts": {
        "type": "array", "items": _ref("Contact"),
        "description": "its first 200 contacts in e-mail order (contact_count has them all)"}}),
    "CompanyList": _obj({"companies": {"type": "array", "items": _ref("Company")},
                         "next_cursor": _nullable("string")}),
    "CompanyTimeline": _obj({"domain": _STR, "company": _ref("Company"),
                             "messages": {"type": "array", "items": _ref("MessageSummary")},
                             "next_cursor": _nullable("string")}),
    "ContactInput": {"type": "object", "required": ["email"], "additionalProperties": False,
                     "properties": {"email": {"type": "string", "format": "email"},
                                    **{k: {"type": ["string", "null"], "maxLength": 1000,
                                           "description": "null or empty: keep the stored value"}
                                       for k in (
                                        "first_name", "last_name", "company", "domain", "title",
                                        "phone")},
                                    **{k: {"type": ["string", "null"], "description":
                                           "a login under users: (400 otherwise); null or "
                                           "empty: keep the stored value"}
                                       for k in ("owner", "company_owner")},
                                    "fields": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}},
    "UpsertResult": _obj({"created": _COUNT, "updated": _COUNT, "unchanged": _COUNT,
                          "companies_created": _COUNT, "messages_linked": _COUNT}),
    "AccountList": _obj({"accounts": {"type": "array", "items": _ref("Account")}}),
    "AccountInput": {
        "type": "object", "required": ["id", "email"],
        "description": "An `accounts:` entry of gateway.yaml, without files: the secret goes in "
                       "auth.password (method password) or auth.refresh_token (method oauth2) and is "
                       "stored encrypted; method service names a service account of gateway.yaml.",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
            "email": _STR, "provider": _STR,
            "imap": {"type": "object", "properties": {"host": _STR, "port": {"type": "integer"},
                                                      "tls": {"enum": ["none", "starttls", "implicit"]}}},
            "smtp": {"type": "object"},
            "auth": {"type": "object", "properties": {
                "method": {"enum": ["password", "oauth2", "service"]}, "username": _STR,
                "password": {"type": "string", "writeOnly": True},
                "refresh_token": {"type": "string", "writeOnly": True},
                "oauth_provider": _STR, "service_account": _STR,
                "mechanism": {"enum": ["xoauth2", "oauthbearer"]}}},
            "sync": _ref("SyncSettings"),
            "send_as": _STRS, "shared": {"type": "boolean"}, "assign": _ref("AssignSettings")}},
    "AssignSettings": {"type": "object", "additionalProperties": False, "properties": {
        "fallback": {"enum": ["round_robin", "none"]},
        "users": {**_STRS, "description": "logins under users: (round_robin takes turns)"}}},
    "SyncSettings": {"type": "object", "additionalProperties": False, "properties": {
        "direction": {"enum": ["two-way", "one-way"]}, "folders": _STRS,
        "history_days": {"type": "integer", "minimum": 0}, "enabled": {"type": "boolean"}}},
    "AccountPatch": {"type": "object", "description": "What to change; flat sync keys are "
                     "accepted too (folders, direction, history_days, enabled).",
                     "properties": {"sync": _ref("SyncSettings"), "send_as": _STRS,
                                    "shared": {"type": "boolean"}, "assign": _ref("AssignSettings"),
                                    "folders": _STRS, "direction": {"enum": ["two-way", "one-way"]},
                                    "history_days": {"type": "integer"}, "enabled": {"type": "boolean"},
                                    "imap": {"type": "object"}, "smtp": {"type": "object"},
                                    "auth": {"type": "object", "properties": {
                                        "password": {"type": "string", "writeOnly": True}}}}},
    "AccountDeleted": {"type": "object", "required": ["id", "status"],
                       "properties": {"id": _STR, "status": {"const": "deleted"},
                                      "previous_status": _nullable("string"),
                                      "purged": {"type": "object"}}},
    "AccountTest": {"type": "object", "required": ["id", "ok"],
                    "description": "IMAP: logged_in, capabilities, folders, folder_problems, "
                                   "sent_copies_to, or error/server_text; smtp: server, tls, "
                                   "extensions, auth, ok or error",
                    "properties": {"id": _STR, "ok": {"type": "boolean"}, "error": _STR,
                                   "smtp": {"type": "object"}}},
    "ConnectLinkInput": {"type": "object", "required": ["provider"], "additionalProperties": False,
                         "properties": {"provider": _STR, "email": _STR, "login": _STR,
                                        "account_id": _STR, "sync": _ref("SyncSettings"),
                                        "ttl": {"type": "number", "minimum": 60,
                                                "maximum": 2592000}}},
    "ConnectLink": _obj({"id": _STR, "url": _STR, "provider": _STR, "email": _nullable("string"),
                         "login": _nullable("string"), "account_id": _nullable("string"),
                         "expires_at": _TIME}),
    "ConnectLinkState": {"type": "object", "required": ["id", "state"], "properties": {
        "id": _STR, "provider": _STR, "email": _nullable("string"), "login": _nullable("string"),
        "account_id": _nullable("string"), "state": {"enum": ["new", "opened", "used", "expired"]},
        "created_at": _TIME, "expires_at": _TIME, "opened_at": _TIME_OR_NULL,
        "used_at": _TIME_OR_NULL, "result": _nullable("string"),
        "result_detail": _nullable("string"), "result_account": _nullable("string")}},
    "Reconnect": {"type": "object", "required": ["id"], "properties": {
        "id": _STR, "connect_link": _ref("ConnectLink"), "status": _nullable("string"),
        "previous_status": _nullable("string")}},
    "EngagementRow": _ENGAGEMENT_ROW,
    "Engagement": _obj({"days": {"type": "integer"}, "since": _TIME, "until": _TIME,
                        "by": {"enum": ["template", "campaign", "user", "domain", None]},
                        "groups": {"type": "array", "items": _ref("EngagementRow")},
                        "total": _ref("EngagementRow")}),
    "Webhook": _obj({"url": _STR, "events": _STRS, "configured": {"type": "boolean"},
                     "pending": _COUNT, "delivered": _COUNT, "dead": _COUNT,
                     "oldest_pending_at": _TIME_OR_NULL, "last_error": _nullable("string")}),
    "WebhookList": _obj({"webhooks": {"type": "array", "items": _ref("Webhook")}}),
    "Node": _obj({"id": _STR, "hostname": _STR, "pid": _COUNT, "started_at": _TIME,
                  "heartbeat_at": _TIME,
                  "heartbeat_age": {"type": "number", "description": "seconds since it"},
                  "live": {"type": "boolean", "description": "heard from within sync.lease_ttl: "
                                                            "mailboxes are placed on it"},
                  "accounts": {**_STRS, "description": "the mailboxes whose lease it holds"}}),
    "NodeList": _obj({"nodes": {"type": "array", "items": _ref("Node")},
                      "lease_ttl": {"type": "number"}}),
    # -- webhook payloads (the document's `webhooks`; README "Read API, metrics and webhooks")
    "WebhookMessage": {**_obj({k: v for k, v in _SUMMARY_PROPS.items() if k != "events"}),
                       "description": "a message as GET /api/v1/messages lists it, less "
                                      "`events`: `id` is the store's id, `message_id` the "
                                      "Message-ID header"},
    "MessageStoredData": _obj({"message": {**_ref("MessageDetail"), "description":
                                           "the message as GET /api/v1/messages/{id} returns "
                                           "it when it was stored"}}),
    "MessageEventData": _obj({
        "message": _ref("WebhookMessage"), "event": _ref("Event"),
        "tracking": {**_obj({"recipient": _ref("TrackingRecipient"),
                             "total": _ref("TrackingTotals")}),
                     "description": "message.opened and message.clicked: the tracking summary "
                                    "of the recipient and of the message, this hit included"}},
        required=["message", "event"]),
    "MessageAssignedData": _obj({
        "message": _ref("WebhookMessage"), "account": _STR, "assigned_to": _STR,
        "rule": {"enum": ["contact_owner", "company_owner", "sticky", "round_robin"]},
        "contact": _nullable("string", description="the sender's contact address")}),
    "AccountEventData": _obj({"account": {"type": "object", "required": ["id", "email", "status"],
                                          "properties": {"id": _STR, "email": _STR,
                                                         "status": _STR}}}),
    "Health": _obj({"status": {"enum": ["ok", "unavailable"]},
                    "store": _obj({"ok": {"type": "boolean"}, "error": _STR}, required=["ok"]),
                    "spool": {"oneOf": [{"type": "null"},
                                        {"type": "object",
                                         "additionalProperties": {"type": "integer"}}]}}),
}


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


#: event types by the schema of their `data` (gateway.config.WEBHOOK_EVENTS has them all)
WEBHOOK_DATA: dict[str, tuple[str, ...]] = {
    "MessageStoredData": ("message.stored",),
    "MessageEventData": tuple(f"message.{t}" for t in (
        "sent", "deferred", "bounced", "delayed", "opened", "clicked", "replied",
        "auto_replied", "read_receipt", "complained")),
    "MessageAssignedData": ("message.assigned",),
    "AccountEventData": ("account.connected", "account.needs_reconnect", "account.deleted"),
}


def _webhook(event_type: str, data: str) -> dict[str, Any]:
    body = {"type": "object", "required": ["id", "type", "created_at", "data"],
            "additionalProperties": False,
            "properties": {"id": {**_STR, "description": "the event id (X-Mailgw-Delivery)"},
                           "type": {"const": event_type}, "created_at": _TIME,
                           "data": _ref(data)}}
    return {"post": {
        "summary": f"{event_type}, POSTed to each webhook subscribed to it",
        "description": "Signed: X-Mailgw-Signature is sha256=<hex HMAC-SHA256 of "
                       "\"<X-Mailgw-Timestamp>.<body>\">; X-Mailgw-Event is the type.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"2XX": {"description": "delivered"},
                      "410": {"description": "never retried"},
                      "default": {"description": "retried with backoff until max_age"}}}}


_ERRORS: dict[str, Any] = {
    "401": {**_json("Error", "no or wrong bearer token"),
            "headers": {"WWW-Authenticate": {"schema": _STR}}},
    "503": _json("Error", "the store is unreachable"),
}
_BAD = {"400": _json("Error", "a bad parameter (named in `parameter`)")}


_ID = {"name": "id", "in": "path", "required": True, "schema": _STR}
_MESSAGE_ID = {"name": "id", "in": "path", "required": True, "schema": _STR,
               "description": "message id, or a relay/ingest queue id"}
_DOMAIN = {"name": "domain", "in": "path", "required": True, "schema": _STR,
           "description": "the company's e-mail domain (a malformed one is a 400)"}
_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    # an empty value is refused (400) like any bad one: leave the parameter out instead
    if schema.get("type") == "string":
        schema = {**schema, "minLength": 1}
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_PAGE_PARAMS = [
    _q("limit", {"type": "integer", "minimum": 1, "default": DEFAULT_LIMIT},
       f"page size (values above {MAX_LIMIT} are capped to {MAX_LIMIT})"),
    _q("cursor", _STR, "`next_cursor` of the previous page (opaque)"),
]
_NEXT_LINK = {"Link": {"schema": _STR, "description": '`<URL of the next page>; rel="next"`, '
                                                      "absent on the last page"}}


#: The CRM's control headers (README "Control headers"; gateway.mail.controls): set on mail
#: submitted to the relay, read into the store, removed before the message leaves.
CONTROL_HEADERS: list[dict[str, Any]] = [
    {"name": "X-Mailgw-Template", "value": "text, at most 200 characters",
     "stored_as": "template", "description": "the template the message was made from; "
     "`GET /api/v1/stats/engagement?by=template`"},
    {"name": "X-Mailgw-Campaign", "value": "text, at most 200 characters",
     "stored_as": "campaign", "description": "the campaign it belongs to; "
     "`GET /api/v1/stats/engagement?by=campaign`"},
    {"name": "X-Mailgw-No-Track", "value": "yes | true | 1 | no | false | 0",
     "description": "yes: no open pixel and no rewritten links in this message, whatever "
     "the policies say"},
    {"name": "X-Mailgw-Send-At",
     "value": "RFC 5322 date or ISO 8601 with an offset, at most 30 days ahead",
     "stored_as": "scheduled_at", "description": "scheduled send: the copy waits in the "
     "queue until then (`mailgw queue list` shows it, `queue delete` cancels it); now or "
     "past: sent at once"},
]
CONTROL_HEADERS_TEXT = (
    "Control headers the CRM may set on mail it submits: " + ", ".join(
        f"`{h['name']}` ({h['value']})" for h in CONTROL_HEADERS)
    + ". They are read into the store (MessageDetail `template`, `campaign`, "
    "`scheduled_at`) and removed before anything leaves the gateway (never DKIM-signed). "
    "An invalid or repeated one refuses the submission with `554 5.6.0` naming it.")


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the admin listener."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "mailgw read API", "version": __version__,
                 "description": "Access to the CRM store of a mailgw gateway (read-only but for "
                                "contact upserts and connected accounts). Every "
                                "/api/v1 route except this document needs "
                                "`Authorization: Bearer <token>` (listeners.admin.token_file).\n\n"
                                + CONTROL_HEADERS_TEXT},
        "x-mailgw-control-headers": CONTROL_HEADERS,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "security": [{"bearer": []}],
        "webhooks": {t: _webhook(t, data) for data, types in WEBHOOK_DATA.items()
                     for t in types},
        "paths": {
            "/api/v1/messages": {"get": {
                "summary": "Stored messages, newest first (by Date, else when stored)",
                "parameters": [
                    _q("q", {"type": "string", "maxLength": 500},
                       "search: words, \"quoted phrases\" and addresses, all of them in the "
                       "subject, sender's name, From/To/Cc or body (stems: pricing finds "
                       "prices; acme.test: every address at the domain)"),
                    _q("contact", {"type": "string", "format": "email"},
                       "an address among From, To and Cc"),
                    _q("account", _STR, "stored for, or seen in the mailbox of, this account"),
                    _q("direction", {"enum": list(DIRECTIONS)}, "inbound or outbound"),
                    _q("since", _STR, "YYYY-MM-DD or ISO 8601 (UTC without a zone)"),
                    _q("assigned_to", _STR, "assigned to this user (a login under users:) by a "
                                            "shared mailbox"),
                    *_PAGE_PARAMS],
                "responses": {"200": {**_json("MessagePage"), "headers": _NEXT_LINK},
                              **_BAD, **_ERRORS}}},
            "/api/v1/messages/{id}": {"get": {
                "summary": "One message with bodies, sources and events",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR,
                                "description": "message id, or a relay/ingest queue id"}],
                "responses": {"200": _json("MessageDetail"), "404": _json("Error", "no such message"),
                              **_ERRORS}}},
            "/api/v1/messages/{id}/raw": {"get": {
                "summary": "The message's original bytes, as relayed, fetched or ingested",
                "parameters": [_MESSAGE_ID],
                "responses": {"200": {"description": "the raw message (Content-Disposition: "
                                                     "attachment)",
                                      "content": {"message/rfc822": {"schema": _BINARY}}},
                              "404": _json("Error", "no such message, or its raw bytes were not "
                                           "kept (store.raw: none)"), **_ERRORS}}},
            "/api/v1/messages/{id}/attachments/{n}": {"get": {
                "summary": "Attachment n (its index in the message's `attachments`), decoded, "
                           "with its type and file name",
                "parameters": [_MESSAGE_ID,
                               {"name": "n", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 0},
                                "description": "index in `attachments`, from 0"}],
                "responses": {"200": {"description": "the decoded part (Content-Type as the "
                                                     "message says; Content-Disposition: "
                                                     "attachment with its file name)",
                                      "content": {"*/*": {"schema": _BINARY}}},
                              **_BAD,
                              "404": _json("Error", "no such message or attachment, or its raw "
                                           "bytes were not kept"), **_ERRORS}}},
            "/api/v1/companies": {"get": {
                "summary": "Companies in domain order, with contact and message counts",
                "parameters": [_q("search", _STR, "part of a domain or name"), *_PAGE_PARAMS],
                "responses": {"200": {**_json("CompanyList"), "headers": _NEXT_LINK},
                              **_BAD, **_ERRORS}}},
            "/api/v1/companies/{domain}": {"get": {
                "summary": "One company with its counts and contacts",
                "parameters": [_DOMAIN],
                "responses": {"200": _json("CompanyDetail"), **_BAD,
                              "404": _json("Error", "no such company"), **_ERRORS}}},
            "/api/v1/companies/{domain}/timeline": {"get": {
                "summary": "The messages linked to a company, newest first",
                "parameters": [_DOMAIN, *_PAGE_PARAMS],
                "responses": {"200": {**_json("CompanyTimeline"), "headers": _NEXT_LINK}, **_BAD,
                              "404": _json("Error", "no such company"), **_ERRORS}}},
            "/api/v1/contacts": {
                "get": {
                    "summary": "Contacts in e-mail order",
                    "parameters": [_q("search", _STR, "part of an e-mail, name or company"),
                                   *_PAGE_PARAMS],
                    "responses": {"200": {**_json("ContactList"), "headers": _NEXT_LINK},
                                  **_BAD, **_ERRORS}},
                "post": {
                    "summary": "Create or update contacts (at most 1000); new ones get their "
                               "stored mail linked",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "oneOf": [{"type": "array", "items": _ref("ContactInput")},
                                  _obj({"contacts": {"type": "array",
                                                     "items": _ref("ContactInput")}})]}}}},
                    "responses": {"200": _json("UpsertResult"), **_BAD, **_ERRORS}}},
            "/api/v1/ambiguous-contacts": {"get": {
                "summary": "Addresses `crm.link_by: name` left unlinked: several contacts have "
                           "their display name",
                "parameters": _PAGE_PARAMS,
                "responses": {"200": {**_json("AmbiguousList"), "headers": _NEXT_LINK},
                              **_BAD, **_ERRORS}}},
            "/api/v1/suppressions": {
                "get": {
                    "summary": "The suppression list in address order (hard bounces, complaints, "
                               "added by hand)",
                    "parameters": [_q("reason", {"enum": list(SUPPRESSION_REASONS)},
                                      "only this reason"),
                                   _q("q", _STR, "addresses starting with this"), *_PAGE_PARAMS],
                    "responses": {"200": {**_json("SuppressionList"), "headers": _NEXT_LINK},
                                  **_BAD, **_ERRORS}},
                "post": {
                    "summary": "Put an address on the suppression list (reason manual; an "
                               "address already listed keeps its first reason)",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("SuppressionInput")}}},
                    "responses": {"201": _json("Suppression", "added"),
                                  "200": _json("Suppression", "already listed"), **_BAD,
                                  **_ERRORS}}},
            "/api/v1/suppressions/{address}": {
                "get": {
                    "summary": "One suppressed address",
                    "parameters": [{"name": "address", "in": "path", "required": True,
                                    "schema": _STR}],
                    "responses": {"200": _json("Suppression"),
                                  "404": _json("Error", "not on the list"), **_ERRORS}},
                "delete": {
                    "summary": "Take an address off the suppression list",
                    "parameters": [{"name": "address", "in": "path", "required": True,
                                    "schema": _STR}],
                    "responses": {"204": {"description": "removed"},
                                  "404": _json("Error", "not on the list"), **_ERRORS}}},
            "/api/v1/contacts/{email}": {
                "get": {
                    "summary": "One contact",
                    "parameters": [{"name": "email", "in": "path", "required": True,
                                    "schema": _STR}],
                    "responses": {"200": _json("Contact"), "404": _json("Error", "no such contact"),
                                  **_ERRORS}},
                "put": {
                    "summary": "Create or update one contact (empty values keep the stored ones)",
                    "parameters": [{"name": "email", "in": "path", "required": True,
                                    "schema": _STR}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("ContactInput")}}},
                    "responses": {"200": _json("Contact", "updated"),
                                  "201": _json("Contact", "created"), **_BAD, **_ERRORS}}},
            "/api/v1/contacts/{email}/timeline": {"get": {
                "summary": "The messages from, to or copying an address, newest first",
                "parameters": [{"name": "email", "in": "path", "required": True, "schema": _STR},
                               *_PAGE_PARAMS],
                "responses": {"200": {**_json("Timeline"), "headers": _NEXT_LINK}, **_BAD,
                              **_ERRORS}}},
            "/api/v1/companies/{domain}/owner": {"put": {
                "summary": "Set or clear the owner of a company (shared mailboxes assign its "
                           "people's mail to them)",
                "parameters": [{"name": "domain", "in": "path", "required": True, "schema": _STR}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("CompanyOwnerInput")}}},
                "responses": {"200": _json("CompanyOwner"), **_BAD,
                              "404": _json("Error", "no such company"), **_ERRORS}}},
            "/api/v1/accounts": {"get": {
                "summary": "Connected mailboxes (declared and created at run time) with their state",
                "responses": {"200": _json("AccountList"), **_ERRORS}},
                "post": {
                    "summary": "Create an account at run time (stored, secret encrypted, synced "
                               "within seconds)",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("AccountInput")}}},
                    "responses": {"201": _json("Account", "created"), **_BAD,
                                  "409": _json("Error", "the id is taken or declared in gateway.yaml"),
                                  **_ERRORS}}},
            "/api/v1/accounts/{id}": {
                "patch": {
                    "summary": "Change a runtime account: sync settings, send-as users, servers",
                    "parameters": [_ID],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": _ref("AccountPatch")}}},
                    "responses": {"200": _json("Account"), **_BAD, "404": _json("Error", "no such account"),
                                  "409": _json("Error", "declared in gateway.yaml"), **_ERRORS}},
                "delete": {
                    "summary": "Stop syncing the account; with purge=true also remove its stored mail",
                    "parameters": [_ID, _q("purge", {"type": "boolean", "default": False},
                                           "also remove the mail stored from it")],
                    "responses": {"200": _json("AccountDeleted"), **_BAD,
                                  "404": _json("Error", "no such account"),
                                  "409": _json("Error", "still being synced; purge again shortly"),
                                  **_ERRORS}}},
            "/api/v1/accounts/{id}/test": {"post": {
                "summary": "IMAP login and folder list, SMTP connect, TLS and AUTH (nothing is sent)",
                "parameters": [_ID],
                "responses": {"200": _json("AccountTest"), "404": _json("Error", "no such account"),
                              **_ERRORS}}},
            "/api/v1/accounts/{id}/reconnect": {"post": {
                "summary": "OAuth accounts: a new connect link (201); others: try logging in again now",
                "parameters": [_ID],
                "responses": {"200": _json("Reconnect"), "201": _json("Reconnect", "a connect link"),
                              "404": _json("Error", "no such account"), **_ERRORS}}},
            "/api/v1/connect-links": {"post": {
                "summary": "A signed, single-use, expiring link a rep opens to connect their mailbox",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("ConnectLinkInput")}}},
                "responses": {"201": _json("ConnectLink", "created"), **_BAD, **_ERRORS}}},
            "/api/v1/connect-links/{id}": {"get": {
                "summary": "A connect link's state and result",
                "parameters": [_ID],
                "responses": {"200": _json("ConnectLinkState"), "404": _json("Error", "no such link"),
                              **_ERRORS}}},
            "/api/v1/accounts/{id}/sync": {"get": {
                "summary": "One account's sync state per folder and its recent sync runs",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": _json("SyncStatus"),
                              "404": _json("Error", "no such account"), **_ERRORS}}},
            "/api/v1/stats/engagement": {"get": {
                "summary": "Engagement counts and rates (see `mailgw report engagement`)",
                "parameters": [
                    _q("days", {"type": "integer", "minimum": 1, "maximum": 3650, "default": 30},
                       "window: messages first relayed in the last N days"),
                    _q("by", {"enum": ["template", "campaign", "user", "domain"]}, "grouping")],
                "responses": {"200": _json("Engagement"), **_BAD, **_ERRORS}}},
            "/api/v1/webhooks": {"get": {
                "summary": "Configured webhooks and their outbox: pending, delivered, dead",
                "responses": {"200": _json("WebhookList"), **_ERRORS}}},
            "/api/v1/nodes": {"get": {
                "summary": "The nodes (daemons) heard from and the mailboxes each tails now",
                "responses": {"200": _json("NodeList"), **_ERRORS}}},
            "/api/v1/openapi.json": {"get": {
                "summary": "This document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {"schema": {
                                          "type": "object"}}}}}}},
            "/healthz": {"get": {
                "summary": "Liveness and store reachability (no token needed)", "security": [],
                "responses": {"200": _json("Health"),
                              "503": _json("Health", "the store is unreachable")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics, text format (no token needed)", "security": [],
                "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                      "content": {"text/plain": {"schema": _STR}}}}}},
        },
    }
