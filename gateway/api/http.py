"""The admin listener (aiohttp): the read API under /api/v1, /healthz and /metrics.

Routes (``gateway.api.openapi`` documents them, served at ``/api/v1/openapi.json``)::

    GET /api/v1/messages?q=&contact=&account=&direction=&since=&assigned_to=&limit=&cursor=   q: search
    GET /api/v1/messages/{id}                  bodies, sources, events; 404 if unknown
    GET /api/v1/messages/{id}/raw              the original bytes (message/rfc822); 404 if not kept
    GET /api/v1/messages/{id}/attachments/{n}  attachment n of the message's list, decoded
    GET /api/v1/contacts/{email}/timeline?limit=&cursor=
    GET /api/v1/ambiguous-contacts?limit=&cursor=   addresses link_by: name left unlinked
    GET /api/v1/companies?search=&limit=&cursor=, /companies/{domain}, /companies/{domain}/timeline
    PUT /api/v1/companies/{domain}/owner       {"owner": login | null}: shared-mailbox routing
    GET /api/v1/accounts                       connected mailboxes (declared and runtime) + state
    POST/PATCH/DELETE /api/v1/accounts..., /api/v1/connect-links   see gateway.api.accounts
    GET /api/v1/stats/engagement?days=&by=     see gateway.crm.reports
    GET /api/v1/suppressions?reason=&q=&limit=&cursor=   the suppression list
    GET|DELETE /api/v1/suppressions/{address}, POST /api/v1/suppressions {address, detail}
    GET /api/v1/webhooks                       webhooks and their outbox counts
    GET /api/v1/nodes                          nodes heard from, and the mailboxes each tails
    GET /api/v1/openapi.json                   no token needed
    GET /healthz                               no token; 503 when the store is unreachable
    GET /metrics                               no token; Prometheus text format

Authentication. Every /api/v1 route but the OpenAPI document needs
``Authorization: Bearer <token>`` with the token from ``listeners.admin.token_file``
(compared in constant time; re-read on SIGHUP); otherwise 401 with
``WWW-Authenticate: Bearer``. Without a token file the API is open, which the
configuration allows only when the listener binds loopback (and :meth:`AdminAPI.start`
refuses otherwise). ``/healthz`` and ``/metrics`` never need the token: they reveal
no mail and are meant for a local Prometheus and systemd/load-balancer checks; keep
the admin listener on loopback or a management network.

Pagination. Lists are newest first; ``next_cursor`` (also as ``Link: <...>; rel="next"``)
is an opaque base64url token of the last row's (sort time, id), so pages never
overlap or skip rows even when many share one time. ``limit`` defaults to 50 and is
capped at 200. A bad parameter is 400 with ``{"error": ..., "parameter": NAME}``; any
error is JSON. Query parameters are strict (:func:`check_query`): one the route does not
document, one given twice or one given empty is a bad parameter; integers are ASCII digits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
import structlog
from aiohttp import web

from gateway.accounts.service import AccountService
from gateway.api import openapi
from gateway.api.accounts import AccountRoutes
from gateway.config import Config
from gateway.crm import originals, outbox, search
from gateway.crm.accounts import Accounts
from gateway.crm.companies import company_timeline, get_company, list_companies, normalize_domain
from gateway.crm.contacts import (
    ContactInput,
    company_domain_for,
    contact_timeline,
    get_contact,
    list_contacts,
    set_company_owner,
    upsert_contacts,
    valid_email,
)
from gateway.crm.identify import list_ambiguous
from gateway.crm.models import DIRECTIONS, SUPPRESSION_REASONS, Message, sort_at
from gateway.crm.reports import GROUPINGS, MAX_DAYS, engagement
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from gateway.crm.views import RAW_NOT_KEPT
from gateway.errors import GatewayError, NotFound, StoreError
from gateway.mail.parse import AttachmentData
from gateway.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SpoolCounts = Callable[[], Mapping[str, int]]
HEALTH_TIMEOUT = 3.0
_messages_id = Message.__table__.c.id
#: the largest id a cursor may carry (the store's 64-bit integer keys)
MAX_ID = 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,18}")


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# -- parameters -----------------------------------------------------------------------------
def encode_cursor(at: datetime, pk: int) -> str:
    raw = json.dumps([at.astimezone(UTC).isoformat(), pk], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(value: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        at, pk = json.loads(raw)
        t = datetime.fromisoformat(at)
        if (not isinstance(pk, int) or isinstance(pk, bool) or not 0 <= pk <= MAX_ID
                or t.tzinfo is None):
            raise ValueError
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise BadParameter("cursor", "not a cursor returned by this API") from None
    return t, pk


def _typed(q: Mapping[str, str], name: str) -> str | None:
    """A parameter's value; None when absent. Present but empty (`?limit=`) is a bad
    parameter, not the default (check_query refuses it first on /api routes)."""
    value = q.get(name)
    if value == "":
        raise BadParameter(name, "empty value (leave the parameter out for the default)")
    return value


def _integer(name: str, value: str) -> int:
    # int() would take Unicode digits ('١٢'), '1_000', blanks and 4,000 digits; an API
    # integer is ASCII digits that fit a 64-bit column
    if not _INTEGER.fullmatch(value):
        raise BadParameter(name, f"{value[:40]!r} is not an integer")
    return int(value)


def _limit(q: Mapping[str, str]) -> int:
    value = _typed(q, "limit")
    if value is None:
        return openapi.DEFAULT_LIMIT
    n = _integer("limit", value)
    if n < 1:
        raise BadParameter("limit", "must be at least 1")
    return min(n, openapi.MAX_LIMIT)


def _since(q: Mapping[str, str]) -> datetime | None:
    value = _typed(q, "since")
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise BadParameter("since", f"{value[:40]!r} is not a date (YYYY-MM-DD or ISO 8601)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _choice(q: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _typed(q, name)
    if value is not None and value not in allowed:
        raise BadParameter(name, f"{value[:40]!r}: expected one of {', '.join(allowed)}")
    return value


def _int_param(q: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _typed(q, name)
    if value is None:
        return default
    n = _integer(name, value)
    if not low <= n <= high:
        raise BadParameter(name, f"must be between {low} and {high}")
    return n


def _query_parameters(doc: Mapping[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """(METHOD, path template) → the query parameter names the OpenAPI document lists."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            out[(method.upper(), path)] = frozenset(
                p["name"] for p in op.get("parameters", []) if p["in"] == "query")
    return out


def check_query(request: web.Request, known: Mapping[tuple[str, str], frozenset[str]]) -> None:
    """Refuse query parameters the route does not document, any given twice, and empty ones.

    A typo (`?limt=10`), a repeated `?limit=1&limit=500` or an empty `?limit=` would
    otherwise be silently ignored or half-read; each is 400 naming the parameter."""
    resource = request.match_info.route.resource
    allowed = known.get((request.method, resource.canonical)) if resource is not None else None
    if allowed is None:
        return   # not a documented route: the router answers 404/405
    for name in dict.fromkeys(request.query):   # in request order: the first bad one is named
        if name not in allowed:
            raise BadParameter(name[:100] or "(empty name)", "unknown parameter"
                               + (f" (this route takes: {', '.join(sorted(allowed))})"
                                  if allowed else " (this route takes none)"))
        if len(request.query.getall(name)) > 1:
            raise BadParameter(name, "given more than once")
        if request.query[name] == "":
            raise BadParameter(name, "empty value (leave the parameter out for the default)")


MAX_UPSERT = 1000
MAX_DETAIL = 500   # SuppressionInput.detail
_CONTACT_FIELDS = ("first_name", "last_name", "company", "domain", "title", "phone", "owner",
                   "company_owner")


def contact_input(obj: Any, where: str) -> ContactInput:
    """A contact from API JSON; BadParameter names the field (`contacts[3].email`)."""
    if not isinstance(obj, dict):
        raise BadParameter(where, "expected a JSON object")
    email = str(obj.get("email") or "").strip().strip("<>").lower()
    if not valid_email(email):
        raise BadParameter(f"{where}.email", f"{obj.get('email')!r} is not an e-mail address")
    values: dict[str, str] = {}
    for k in _CONTACT_FIELDS:
        v = obj.get(k, "")
        if v is None:
            v = ""
        if not isinstance(v, str) or len(v) > 1000:
            raise BadParameter(f"{where}.{k}", "expected a string of at most 1000 characters")
        values[k] = v.strip()
    fields = obj.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in fields.items()):
        raise BadParameter(f"{where}.fields", "expected an object of strings")
    unknown = set(obj) - {"email", "fields", *_CONTACT_FIELDS}
    if unknown:
        raise BadParameter(f"{where}.{sorted(unknown)[0]}", "unknown field")
    c = ContactInput(email=email, first_name=values["first_name"],
                     last_name=values["last_name"], company=values["company"],
                     domain=values["domain"].lower(), title=values["title"],
                     phone=values["phone"], fields=dict(fields), owner=values["owner"],
                     company_owner=values["company_owner"])
    if c.company_owner and company_domain_for(c) is None:
        raise BadParameter(f"{where}.company_owner", "needs a company: a domain, or a company "
                                                     "name with a company e-mail address")
    return c


def resolve_owner_logins(cfg: Config, inputs: list[ContactInput], wheres: list[str]) -> None:
    """Owners must be logins under ``users:`` (400 naming the field); spelled as configured."""
    for c, where in zip(inputs, wheres, strict=True):
        for key in ("owner", "company_owner"):
            login = getattr(c, key)
            if login:
                user = cfg.user(login)
                if user is None:
                    raise BadParameter(f"{where}.{key}", f"no user with login {login!r} in users:")
                setattr(c, key, user.login)


_MIME_TOKEN = re.compile(r"[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}")
_CHARSET = re.compile(r"[A-Za-z0-9!#$%&'+^_`{}~.-]{1,40}")


def attachment_headers(part: AttachmentData) -> dict[str, str]:
    """Content-Type and Content-Disposition for an attachment's bytes, from what the
    message said but never more: a type that is no plain ``type/subtype`` token is served
    as application/octet-stream, the file name goes out percent-encoded
    (``filename*=UTF-8''…``, RFC 6266) with an ASCII ``filename=`` fallback, so no header
    can be split or extended by what the sender wrote."""
    a = part.attachment
    ctype = a.content_type if _MIME_TOKEN.fullmatch(a.content_type) else "application/octet-stream"
    if ctype.startswith("text/") and part.charset and _CHARSET.fullmatch(part.charset):
        ctype += f"; charset={part.charset}"
    name = a.filename or "attachment"
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\%;' else "_"
                       for c in name)
    disposition = f'attachment; filename="{fallback}"'
    if fallback != name:
        disposition += f"; filename*=UTF-8''{quote(name, safe='')}"
    return {"Content-Type": ctype, "Content-Disposition": disposition,
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox"}


class AdminAPI:
    """The admin listener's aiohttp application and its server."""

    def __init__(self, store: Store, *, get_config: Callable[[], Config], metrics: Metrics,
                 token: str | None, spool_counts: SpoolCounts | None = None,
                 log: Any = None, accounts: AccountService | None = None) -> None:
        self.store = store
        self.account_service = accounts   # read-write accounts and connect links
        self.get_config = get_config
        self.metrics = metrics
        self.spool_counts = spool_counts
        self.log = log or structlog.get_logger("mailgw.api")
        self._token: bytes | None = None
        self.set_token(token)
        self._query_parameters = _query_parameters(openapi.document())
        self._parse_slots = asyncio.Semaphore(originals.PARSE_SLOTS)   # attachment parses
        self.app = self._build()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def set_token(self, token: str | None) -> None:
        """Replace the bearer token (on reload); None or empty: no authentication."""
        token = (token or "").strip()
        self._token = token.encode() if token else None

    # -- server -------------------------------------------------------------------------
    async def start(self, host: str, port: int, *, loopback_only: bool,
                    shutdown_timeout: float = 5.0, reuse_port: bool = False) -> None:
        """Listen on host:port (port 0: any free port, then in :attr:`port`); with
        `reuse_port` (SO_REUSEPORT) every worker process binds the same port.

        Requests in flight get `shutdown_timeout` seconds to finish when stopping."""
        if self._token is None and not loopback_only:
            raise GatewayError(f"the admin listener on {host} needs listeners.admin.token_file "
                               "(without a token it may bind loopback only)")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=shutdown_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True,
                              reuse_port=reuse_port or None).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- app ----------------------------------------------------------------------------
    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/api/v1/messages", self.messages)
        r.add_get("/api/v1/messages/{id}", self.message)
        r.add_get("/api/v1/messages/{id}/raw", self.message_raw)
        r.add_get("/api/v1/messages/{id}/attachments/{n}", self.message_attachment)
        r.add_get("/api/v1/companies", self.companies)
        r.add_get("/api/v1/companies/{domain}", self.company)
        r.add_get("/api/v1/companies/{domain}/timeline", self.company_timeline)
        r.add_get("/api/v1/contacts", self.contacts)
        r.add_post("/api/v1/contacts", self.contacts_upsert)
        r.add_get("/api/v1/contacts/{email}", self.contact)
        r.add_put("/api/v1/contacts/{email}", self.contact_put)
        r.add_get("/api/v1/contacts/{email}/timeline", self.timeline)
        r.add_get("/api/v1/ambiguous-contacts", self.ambiguous)
        r.add_put("/api/v1/companies/{domain}/owner", self.company_owner)
        r.add_get("/api/v1/accounts", self.accounts)
        r.add_get("/api/v1/accounts/{id}/sync", self.account_sync)
        if self.account_service is not None:
            AccountRoutes(self.account_service).add(r)
        r.add_get("/api/v1/stats/engagement", self.engagement)
        r.add_get("/api/v1/suppressions", self.suppressions_list)
        r.add_post("/api/v1/suppressions", self.suppressions_add)
        r.add_get("/api/v1/suppressions/{address}", self.suppression)
        r.add_delete("/api/v1/suppressions/{address}", self.suppression_delete)
        r.add_get("/api/v1/webhooks", self.webhooks)
        r.add_get("/api/v1/nodes", self.nodes)
        r.add_get("/api/v1/openapi.json", self.openapi_doc)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics_text)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        resp: web.StreamResponse
        try:
            if (request.path.startswith("/api/") and request.path != "/api/v1/openapi.json"
                    and not self._authorized(request)):
                resp = _error(401, "a valid bearer token is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="mailgw"'
            else:
                if request.path.startswith("/api/"):
                    check_query(request, self._query_parameters)
                resp = await handler(request)
        except BadParameter as exc:
            resp = _error(400, f"{exc.parameter}: {exc.message}", parameter=exc.parameter)
        except web.HTTPException as exc:
            resp = _error(exc.status, exc.reason)
            if exc.status == 405:
                resp.headers["Allow"] = exc.headers.get("Allow", "GET")
        except StoreError as exc:
            self.log.error("api_store_error", path=request.path, error=str(exc))
            resp = _error(503, "the store is unavailable")
        self.metrics.api_requests.labels(route, str(resp.status)).inc()
        self.metrics.api_latency.labels(route).observe(time.perf_counter() - started)
        return resp

    # -- pages ----------------------------------------------------------------------------
    async def _sort_key(self, row: dict[str, Any]) -> tuple[datetime, int]:
        if row["date"]:
            return datetime.fromisoformat(row["date"]), row["id"]
        try:  # no Date header: the message sorts by when it was stored
            async with self.store.engine.connect() as conn:
                t = (await conn.execute(sa.select(sort_at).where(_messages_id == row["id"]))).scalar()
        except sa.exc.SQLAlchemyError as exc:
            raise self.store.error("store read failed", exc) from exc
        if t is None:  # deleted meanwhile: no next page can follow it
            raise StoreError(f"message {row['id']} disappeared while paging")
        return (t.replace(tzinfo=UTC) if t.tzinfo is None else t), int(row["id"])

    async def _page(self, request: web.Request, rows: list[dict[str, Any]], limit: int,
                    body: dict[str, Any], key: str = "messages") -> web.Response:
        cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            cursor = encode_cursor(*await self._sort_key(rows[-1]))
        resp = web.json_response({**body, key: rows, "next_cursor": cursor})
        if cursor is not None:
            nxt = request.rel_url.update_query(cursor=cursor)
            resp.headers["Link"] = f'<{nxt}>; rel="next"'
        return resp

    @staticmethod
    def _key_page(request: web.Request, rows: list[dict[str, Any]], limit: int, key: str,
                  field: str) -> web.Response:
        """A page of a list ordered by one unique column (`field`): its last value is the
        cursor of the next page."""
        cursor = rows[limit - 1][field] if len(rows) > limit else None
        resp = web.json_response({key: rows[:limit], "next_cursor": cursor})
        if cursor is not None:
            resp.headers["Link"] = f'<{request.rel_url.update_query(cursor=cursor)}>; rel="next"'
        return resp

    async def messages(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _limit(q)
        direction = _choice(q, "direction", DIRECTIONS)
        since = _since(q)
        before = decode_cursor(q["cursor"]) if q.get("cursor") else None
        contact = _typed(q, "contact")
        if contact is not None:
            contact = contact.strip()
            if "@" not in contact:
                raise BadParameter("contact", f"{contact[:40]!r} is not an e-mail address")
        query = _typed(q, "q")
        assigned_to = _typed(q, "assigned_to")
        if assigned_to is not None:
            user = self.get_config().user(assigned_to)
            if user is None:
                raise BadParameter("assigned_to", f"no user with login {assigned_to[:100]!r} in users:")
            assigned_to = user.login
        try:
            rows = await self.store.list_messages(contact=contact, since=since,
                                                  account=q.get("account") or None,
                                                  direction=direction, before=before,
                                                  limit=limit + 1, query=query,
                                                  assigned_to=assigned_to)
        except search.BadQuery as exc:
            raise BadParameter("q", str(exc)) from None
        return await self._page(request, rows, limit, {})

    async def message(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        row = None
        if ident.isascii() and ident.isdigit() and len(ident) < 19:   # not '²
            row = await self.store.get_message(int(ident), bodies=True)
        if row is None:
            row = await self.store.get_message_by_queue_id(ident, bodies=True)
        if row is None:
            return _error(404, f"no message {ident}")
        return web.json_response(row)

    async def timeline(self, request: web.Request) -> web.Response:
        email = request.match_info["email"].strip().lower()
        if "@" not in email:
            raise BadParameter("email", f"{email!r} is not an e-mail address")
        limit = _limit(request.query)
        before = decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
        rows = await contact_timeline(self.store, email, before=before, limit=limit + 1)
        contact = await get_contact(self.store, email)
        return await self._page(request, rows, limit, {"email": email, "contact": contact})

    # -- the original bytes and companies (README "Read API, metrics and webhooks") --------
    async def _original(self, request: web.Request) -> originals.Original | web.Response:
        """The message the path names with its raw bytes kept, else the 404 to answer."""
        ident = request.match_info["id"]
        found = await originals.locate(self.store, ident)
        if found is None:
            return _error(404, f"no message {ident}")
        if found.digest is None:
            return _error(404, f"message {found.id}: raw bytes {RAW_NOT_KEPT}")
        return found

    async def message_raw(self, request: web.Request) -> web.StreamResponse:
        found = await self._original(request)
        if isinstance(found, web.Response):
            return found
        headers = {"Content-Type": "message/rfc822", "X-Content-Type-Options": "nosniff",
                   "Content-Disposition": f'attachment; filename="message-{found.id}.eml"'}
        path = originals.raw_file(self.store, found)
        if path is not None:   # streamed from the file, never read whole
            return web.FileResponse(path, headers=headers)
        data = await originals.read_raw(self.store, found)
        if data is None:
            return _error(404, f"message {found.id}: its raw bytes are not in the raw store "
                               f"(removed, or store.raw changed since)")
        return web.Response(body=data, headers=headers)

    async def message_attachment(self, request: web.Request) -> web.StreamResponse:
        value = request.match_info["n"]
        n = _integer("n", value)
        if n < 0:
            raise BadParameter("n", "must be at least 0 (the attachment's index in the list)")
        found = await self._original(request)
        if isinstance(found, web.Response):
            return found
        if n >= len(found.attachments):
            return _error(404, f"message {found.id} has no attachment {n} "
                               f"({len(found.attachments)} listed, numbered from 0)")
        part = await originals.read_attachment(self.store, found, n, self._parse_slots)
        if part is None:
            return _error(404, f"message {found.id}: attachment {n} is not in its raw bytes")
        return web.Response(body=part.data, headers=attachment_headers(part))

    async def companies(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _limit(q)
        rows = await list_companies(self.store, search=q.get("search") or None,
                                    after=q.get("cursor") or None, limit=limit + 1)
        return self._key_page(request, rows, limit, "companies", "domain")

    def _domain(self, request: web.Request) -> str:
        value = request.match_info["domain"]
        domain = normalize_domain(value)
        if domain is None:
            raise BadParameter("domain", f"{value[:60]!r} is not a domain")
        return domain

    async def company(self, request: web.Request) -> web.Response:
        domain = self._domain(request)
        row = await get_company(self.store, domain)
        return web.json_response(row) if row is not None else _error(404, f"no company {domain}")

    async def company_timeline(self, request: web.Request) -> web.Response:
        domain = self._domain(request)
        limit = _limit(request.query)
        before = decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
        company = await get_company(self.store, domain, contacts=False)
        if company is None:
            return _error(404, f"no company {domain}")
        rows = await company_timeline(self.store, domain, before=before, limit=limit + 1)
        return await self._page(request, rows, limit, {"domain": domain, "company": company})

    async def accounts(self, request: web.Request) -> web.Response:
        if self.account_service is not None:
            rows = await self.account_service.registry.overview()
        else:
            rows = await Accounts(self.store).overview(self.get_config().accounts)
        return web.json_response({"accounts": rows})

    async def account_sync(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        try:
            info = await Accounts(self.store).sync_info(ident,
                                                        configured=self.get_config().account(ident))
        except NotFound as exc:
            return _error(404, str(exc))
        return web.json_response(info)

    # -- contacts (the one write route family: upserts) ---------------------------------------
    async def contacts(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _limit(q)
        rows = await list_contacts(self.store, search=q.get("search") or None,
                                   after=q.get("cursor") or None, limit=limit + 1)
        return self._key_page(request, rows, limit, "contacts", "email")

    async def ambiguous(self, request: web.Request) -> web.Response:
        """Addresses `crm.link_by: name` left unlinked (gateway.crm.identify)."""
        q = request.query
        limit = _limit(q)
        rows = await list_ambiguous(self.store, after=q.get("cursor") or None, limit=limit + 1)
        return self._key_page(request, rows, limit, "ambiguous", "address")

    async def contact(self, request: web.Request) -> web.Response:
        email = request.match_info["email"].strip().lower()
        row = await get_contact(self.store, email)
        return web.json_response(row) if row is not None else _error(404, f"no contact {email}")

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise BadParameter("body", "not JSON") from None

    async def contact_put(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise BadParameter("body", "expected a JSON object")
        body = {**body, "email": request.match_info["email"]}
        one = contact_input(body, "body")
        resolve_owner_logins(self.get_config(), [one], ["body"])
        result = await upsert_contacts(self.store, [one], source="api")
        row = await get_contact(self.store, body["email"])
        return web.json_response(row, status=201 if result.created else 200)

    async def contacts_upsert(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        items = body.get("contacts") if isinstance(body, dict) else body
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_UPSERT:
            raise BadParameter("contacts", f"expected a list of 1 to {MAX_UPSERT} contacts")
        inputs = [contact_input(x, f"contacts[{i}]") for i, x in enumerate(items)]
        resolve_owner_logins(self.get_config(), inputs, [f"contacts[{i}]" for i in range(len(inputs))])
        seen: set[str] = set()
        for i, c in enumerate(inputs):
            if c.email in seen:
                raise BadParameter(f"contacts[{i}].email", f"{c.email} appears twice")
            seen.add(c.email)
        r = await upsert_contacts(self.store, inputs, source="api")
        return web.json_response({"created": r.created, "updated": r.updated,
                                  "unchanged": r.unchanged,
                                  "companies_created": r.companies_created,
                                  "messages_linked": r.messages_linked})

    async def company_owner(self, request: web.Request) -> web.Response:
        """PUT /api/v1/companies/{domain}/owner {"owner": LOGIN | null}: a shared mailbox
        assigns mail from the company's people (who have no owner) to this user."""
        body = await self._body(request)
        if not isinstance(body, dict) or set(body) != {"owner"}:
            raise BadParameter("body", 'expected {"owner": "<login>"} or {"owner": null}')
        owner = body["owner"]
        if owner is not None:
            user = self.get_config().user(owner) if isinstance(owner, str) else None
            if user is None:
                raise BadParameter("owner", f"no user with login {str(owner)[:100]!r} in users:")
            owner = user.login
        domain = request.match_info["domain"]
        if "\x00" in domain or len(domain) > 255:    # no company has such a domain
            return _error(404, f"no company {domain[:100]!r}")
        row = await set_company_owner(self.store, domain, owner)
        return web.json_response(row) if row is not None else _error(404, f"no company {domain}")

    # -- the suppression list ------------------------------------------------------------
    async def suppressions_list(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _limit(q)
        reason = _choice(q, "reason", SUPPRESSION_REASONS)
        rows = await SuppressionList(self.store).list(
            reason=reason, prefix=q.get("q") or None, after=q.get("cursor") or None,
            limit=limit + 1)
        cursor = rows[limit - 1]["address"] if len(rows) > limit else None
        resp = web.json_response({"suppressions": rows[:limit], "next_cursor": cursor})
        if cursor is not None:
            resp.headers["Link"] = f'<{request.rel_url.update_query(cursor=cursor)}>; rel="next"'
        return resp

    async def suppression(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        row = await SuppressionList(self.store).get(address)
        return web.json_response(row) if row is not None else \
            _error(404, f"{address.strip().lower()} is not on the suppression list")

    async def suppressions_add(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise BadParameter("body", "expected a JSON object")
        address, detail = body.get("address"), body.get("detail", "")
        if not isinstance(address, str) or not address.strip():
            raise BadParameter("address", "required: the e-mail address to suppress")
        if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
            raise BadParameter("detail", f"must be a string of at most {MAX_DETAIL} characters")
        unknown = sorted(set(body) - {"address", "detail"})
        if unknown:
            raise BadParameter(unknown[0], "unknown field (allowed: address, detail)")
        try:
            row, created = await SuppressionList(self.store).add(address, detail=detail,
                                                                created_by="api")
        except ValueError as exc:
            raise BadParameter("address", str(exc)) from None
        return web.json_response(row, status=201 if created else 200)

    async def suppression_delete(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        if not await SuppressionList(self.store).remove(address):
            return _error(404, f"{address.strip().lower()} is not on the suppression list")
        return web.Response(status=204)

    async def engagement(self, request: web.Request) -> web.Response:
        q = request.query
        days = _int_param(q, "days", 30, 1, MAX_DAYS)
        by = _choice(q, "by", GROUPINGS)
        return web.json_response(await engagement(self.store, days=days, by=by))

    async def webhooks(self, request: web.Request) -> web.Response:
        counts = await outbox.summary(self.store)
        empty = {"pending": 0, "delivered": 0, "dead": 0, "oldest_pending_at": None,
                 "last_error": None}
        out = [{"url": w.url, "events": list(w.events), "configured": True,
                **counts.pop(w.url, empty)} for w in self.get_config().webhooks]
        out += [{"url": url, "events": [], "configured": False, **c}
                for url, c in sorted(counts.items())]
        return web.json_response({"webhooks": out})

    async def nodes(self, request: web.Request) -> web.Response:
        ttl = self.get_config().sync.lease_ttl
        rows = await Accounts(self.store).nodes()
        for r in rows:
            r["live"] = r["heartbeat_age"] <= ttl
        return web.json_response({"nodes": rows, "lease_ttl": ttl})

    async def openapi_doc(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def healthz(self, request: web.Request) -> web.Response:
        store: dict[str, Any] = {"ok": True}
        try:
            async def ping() -> None:
                async with self.store.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            await asyncio.wait_for(ping(), HEALTH_TIMEOUT)
        except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            store = {"ok": False, "error": type(exc).__name__ if isinstance(exc, TimeoutError)
                     else self.store.error("unreachable", exc).args[0]}
        spool = None
        if self.spool_counts is not None:
            try:
                spool = dict(await asyncio.to_thread(self.spool_counts))
            except OSError:
                spool = None
        body = {"status": "ok" if store["ok"] else "unavailable", "store": store, "spool": spool}
        return web.json_response(body, status=200 if store["ok"] else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = await self.metrics.collect()
        return web.Response(body=body, headers={"Content-Type": self.metrics.content_type})
