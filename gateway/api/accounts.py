"""The read-write account routes of the admin API: create, change, delete, test, reconnect; connect links.

    POST   /api/v1/accounts                    create an account at run time (201)
    PATCH  /api/v1/accounts/{id}               sync folders, direction, history_days, enabled, send_as
    DELETE /api/v1/accounts/{id}[?purge=true]  stop syncing (history kept, or removed with purge)
    POST   /api/v1/accounts/{id}/test          IMAP login + folders, SMTP connect/TLS/AUTH (no mail)
    POST   /api/v1/accounts/{id}/reconnect     OAuth: a new connect link; others: try again now
    POST   /api/v1/connect-links               a signed, single-use link for one rep (201)
    GET    /api/v1/connect-links/{id}          its state: new, opened, used, expired; the result

Secrets travel in the request body (`auth.password`, `auth.refresh_token`) and are stored
encrypted; they are never returned. Accounts declared in gateway.yaml are listed with the
others but cannot be changed here (409: change the file and reload). Errors are JSON:
400 names the parameter (`{"error", "parameter", "problems": [{"parameter", "message"}]}`),
404 an unknown account or link, 409 a conflict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.accounts.registry import InvalidAccount
from gateway.accounts.service import AccountService
from gateway.errors import AccountError, Conflict, NotFound

__all__ = ["AccountRoutes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: flat PATCH keys and where they go in the account definition
_SYNC_KEYS = {"folders", "direction", "history_days", "enabled"}
#: how long DELETE ?purge=true waits for the tailer to let go of the mailbox
PURGE_WAIT = 30.0


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _invalid(exc: InvalidAccount) -> web.Response:
    problems = [{"parameter": k, "message": m} for k, m in exc.problems]
    first = exc.problems[0][0] if exc.problems else "body"
    return _json_error(400, str(exc), parameter=first or "body", problems=problems)


class AccountRoutes:
    """Handlers over an AccountService; `add(router)` registers them."""

    def __init__(self, service: AccountService) -> None:
        self.service = service

    def add(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_post("/api/v1/accounts", self._wrap(self.create))
        r.add_patch("/api/v1/accounts/{id}", self._wrap(self.patch))
        r.add_delete("/api/v1/accounts/{id}", self._wrap(self.delete))
        r.add_post("/api/v1/accounts/{id}/test", self._wrap(self.test))
        r.add_post("/api/v1/accounts/{id}/reconnect", self._wrap(self.reconnect))
        r.add_post("/api/v1/connect-links", self._wrap(self.create_link))
        r.add_get("/api/v1/connect-links/{id}", self._wrap(self.link))

    @staticmethod
    def _wrap(handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except InvalidAccount as exc:
                return _invalid(exc)
            except Conflict as exc:
                return _json_error(409, str(exc))
            except NotFound as exc:
                return _json_error(404, str(exc))
        return run

    async def _object(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidAccount([("body", "not JSON")]) from None
        if not isinstance(body, dict):
            raise InvalidAccount([("body", "expected a JSON object")])
        return body

    async def _row(self, account_id: str) -> dict[str, Any]:
        rows = await self.service.registry.overview()
        for row in rows:
            if row["id"] == account_id:
                return row
        raise NotFound(f"no account {account_id!r}")

    # -- accounts -------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        auth = body.get("auth")
        if auth is not None and not isinstance(auth, dict):
            raise InvalidAccount([("auth", "expected an object")])
        auth = dict(auth or {})
        password = auth.pop("password", None)
        refresh_token = auth.pop("refresh_token", None)
        for key, value in (("auth.password", password), ("auth.refresh_token", refresh_token)):
            if value is not None and (not isinstance(value, str) or not value or len(value) > 8192):
                raise InvalidAccount([(key, "expected a non-empty string")])
        if password is not None and refresh_token is not None:
            raise InvalidAccount([("auth", "give auth.password or auth.refresh_token, not both")])
        method = auth.get("method", "password")
        if password is not None and method != "password":
            raise InvalidAccount([("auth.password", f"method {method} takes no password")])
        if refresh_token is not None and method != "oauth2":
            raise InvalidAccount([("auth.refresh_token", f"method {method} takes no refresh token")])
        definition = {**body, "auth": auth} if auth or "auth" in body else body
        acct = await self.service.registry.create(definition, secret=password or refresh_token)
        await self.service.changed()
        return web.json_response(await self._row(acct.id), status=201)

    async def patch(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        body = await self._object(request)
        patch: dict[str, Any] = {}
        raw_sync = body.pop("sync", None)
        if raw_sync is not None and not isinstance(raw_sync, dict):
            raise InvalidAccount([("sync", "expected an object")])
        sync: dict[str, Any] = dict(raw_sync or {})
        for k in list(body):
            if k in _SYNC_KEYS:
                sync[k] = body.pop(k)
        password = None
        if isinstance(body.get("auth"), dict) and set(body["auth"]) == {"password"}:
            password = body.pop("auth")["password"]
            if not isinstance(password, str) or not password:
                raise InvalidAccount([("auth.password", "expected a non-empty string")])
            current = self.service.registry.account(ident)
            if current is not None and current.auth.method != "password":
                raise InvalidAccount([("auth.password", f"account {ident} uses method "
                                                        f"{current.auth.method}, not a password")])
        patch.update(body)
        if sync:
            patch["sync"] = sync
        if not patch and password is None:
            raise InvalidAccount([("body", "nothing to change (folders, direction, history_days, "
                                           "enabled, send_as, imap, smtp, auth.password)")])
        acct = await self.service.registry.update(ident, patch, secret=password)
        await self.service.changed()
        return web.json_response(await self._row(acct.id))

    async def delete(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        purge = request.query.get("purge", "false").lower()
        if purge not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidAccount([("purge", "expected true or false")])
        if self.service.registry.account(ident) is None and \
                await self.service.registry.state.get(ident) is None:
            raise NotFound(f"no account {ident!r}")
        was = await self.service.delete(ident, reason="deleted through the API")
        await self.service.changed()
        out: dict[str, Any] = {"id": ident, "status": "deleted", "previous_status": was}
        if purge in ("true", "1", "yes"):
            if not await self._released(ident):
                return _json_error(409, f"account {ident} is still being synced by "
                                        "a node; try the purge again shortly", **out)
            result = await self.service.registry.purge(ident)
            out["purged"] = {"sources": result.sources, "messages": result.messages,
                             "checkpoints": result.checkpoints, "raw_blobs": len(result.raw_blobs)}
        return web.json_response(out)

    async def _released(self, ident: str) -> bool:
        deadline = time.monotonic() + PURGE_WAIT
        while True:
            row = await self.service.registry.state.get(ident) or {}
            if not row.get("lease_owner"):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    async def test(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        try:
            report = await self.service.test(ident)
        except AccountError as exc:
            report = {"id": ident, "ok": False, "error": str(exc)}
        return web.json_response(report)

    async def reconnect(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        acct = self.service.registry.account(ident)
        if acct is None:
            raise NotFound(f"no account {ident!r}")
        if acct.auth.method == "oauth2":
            name = acct.oauth_provider_name
            if name is None:
                raise Conflict(f"account {ident} has no OAuth provider to reconnect through")
            link = await self.service.connect.create(name, email=acct.email, account_id=ident,
                                                     created_by="api")
            return web.json_response({"id": ident, "connect_link": _link(link)}, status=201)
        was = await self.service.registry.state.set_status(ident, "active", None,
                                                           only_from=("needs_reconnect",))
        await self.service.changed()
        return web.json_response({"id": ident, "previous_status": was,
                                  "status": "active" if was == "needs_reconnect" else was})

    # -- connect links --------------------------------------------------------------------
    async def create_link(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        unknown = sorted(set(body) - {"provider", "email", "login", "account_id", "sync", "ttl"})
        if unknown:
            raise InvalidAccount([(unknown[0], "unknown field")])
        provider = body.get("provider")
        if not isinstance(provider, str) or not provider:
            raise InvalidAccount([("provider", "required: google, microsoft or an oauth.providers name")])
        for k in ("email", "login", "account_id"):
            if body.get(k) is not None and not isinstance(body[k], str):
                raise InvalidAccount([(k, "expected a string")])
        if body.get("email") is None and body.get("login") is None and body.get("account_id") is None:
            raise InvalidAccount([("email", "give the rep's email or login (or account_id to reconnect)")])
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool)
                                or not 60 <= ttl <= 30 * 86400):
            raise InvalidAccount([("ttl", "seconds between 60 and 2592000")])
        sync = body.get("sync")
        if sync is not None and not isinstance(sync, dict):
            raise InvalidAccount([("sync", "expected an object")])
        link = await self.service.connect.create(
            provider, email=body.get("email"), login=body.get("login"),
            account_id=body.get("account_id"), settings={"sync": sync} if sync else None,
            created_by="api", ttl=float(ttl) if ttl is not None else None)
        return web.json_response(_link(link), status=201)

    async def link(self, request: web.Request) -> web.Response:
        return web.json_response(await self.service.connect.describe(request.match_info["id"]))


def _link(link: Any) -> dict[str, Any]:
    return {"id": link.id, "url": link.url, "provider": link.provider, "email": link.email,
            "login": link.login, "account_id": link.account_id,
            "expires_at": link.expires_at.isoformat()}
