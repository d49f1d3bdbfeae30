"""A loopback OAuth2 authorization server for tests: a token endpoint and token info for Dovecot.

    with TokenServer() as ts:
        refresh = ts.issue_refresh_token("carol@example.test")
        ts.token_url          # POST grant_type=refresh_token -> {"access_token", "expires_in"}
        ts.tokeninfo_url      # Dovecot's oauth2 passdb appends the bearer token to this URL

It runs aiohttp in a background thread with its own event loop, so it serves requests
from Dovecot's auth process and from the code under test whatever event loop (or none)
the test uses, and it can live for a whole test session.

Behaviour, all thread-safe:

- `issue_refresh_token(email)` -> a refresh token for that user.
- `mint_access_token(email, lifetime)` -> an access token valid for `lifetime` seconds.
- `POST /token` (form: `grant_type=refresh_token`, `refresh_token`, `client_id`,
  `client_secret`; or HTTP basic client authentication) answers with a fresh access token
  that lives `access_lifetime` seconds, or `400 {"error": "invalid_grant"}` for an
  unknown or revoked refresh token, `401 {"error": "invalid_client"}` for a wrong client.
- `fail_next(status, body)` scripts the next token responses (e.g. 503 to test retries).
- `GET /tokeninfo?access_token=T` answers `{"email", "expires_in", "scope"}` for a live
  token and `400 {"error": "invalid_token"}` otherwise (the shape of Google's tokeninfo).
- `grants` lists every token request received (form fields), to count refreshes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["TokenServer"]


@dataclass
class _State:
    clients: dict[str, str] = field(default_factory=dict)
    refresh: dict[str, str] = field(default_factory=dict)          # refresh token -> email
    access: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (email, expiry)
    scripted: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    grants: list[dict[str, str]] = field(default_factory=list)
    tokeninfo_requests: int = 0


class TokenServer:
    """OAuth2 token endpoint + tokeninfo on 127.0.0.1 in a thread (see the module docstring)."""

    def __init__(self, *, client_id: str = "mailgw-test", client_secret: str = "s3cret",
                 access_lifetime: float = 3600.0, scope: str = "https://mail.example.test/") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_lifetime = access_lifetime
        self.scope = scope
        self.port = 0
        self._state = _State(clients={client_id: client_secret})
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- URLs ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def tokeninfo_url(self) -> str:
        return f"{self.base_url}/tokeninfo?access_token="

    # -- state ----------------------------------------------------------------------------
    def issue_refresh_token(self, email: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._state.refresh[token] = email
        return token

    def revoke_refresh_token(self, token: str) -> None:
        with self._lock:
            self._state.refresh.pop(token, None)

    def mint_access_token(self, email: str, lifetime: float | None = None) -> str:
        token = "at-" + secrets.token_urlsafe(24)
        life = self.access_lifetime if lifetime is None else lifetime
        with self._lock:
            self._state.access[token] = (email, time.time() + life)
        return token

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid (as if their lifetime had passed)."""
        with self._lock:
            self._state.access = {t: (e, 0.0) for t, (e, _) in self._state.access.items()}

    def fail_next(self, status: int, body: dict[str, Any] | None = None, times: int = 1) -> None:
        with self._lock:
            self._state.scripted.extend([(status, body or {"error": "temporarily_unavailable"})] * times)

    @property
    def grants(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._state.grants)

    @property
    def tokeninfo_requests(self) -> int:
        with self._lock:
            return self._state.tokeninfo_requests

    # -- handlers -------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        basic = request.headers.get("Authorization", "")
        if basic.lower().startswith("basic "):
            with contextlib.suppress(ValueError):
                client_id, _, client_secret = base64.b64decode(basic[6:]).decode().partition(":")
        with self._lock:
            self._state.grants.append(form)
            if self._state.scripted:
                status, body = self._state.scripted.pop(0)
                return web.json_response(body, status=status)
            if self._state.clients.get(client_id) != client_secret or not client_id:
                return web.json_response({"error": "invalid_client"}, status=401)
            if form.get("grant_type") != "refresh_token":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            email = self._state.refresh.get(form.get("refresh_token", ""))
            if email is None:
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "Token has been expired or revoked."},
                                         status=400)
        token = self.mint_access_token(email)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": int(self.access_lifetime), "scope": self.scope})

    async def _tokeninfo(self, request: web.Request) -> web.Response:
        token = request.query.get("access_token", "")
        with self._lock:
            self._state.tokeninfo_requests += 1
            entry = self._state.access.get(token)
        if entry is None or entry[1] <= time.time():
            return web.json_response({"error": "invalid_token"}, status=400)
        email, expiry = entry
        return web.json_response({"email": email, "expires_in": int(expiry - time.time()),
                                  "scope": self.scope})

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> TokenServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def setup() -> None:
                app = web.Application()
                app.router.add_post("/token", self._token)
                app.router.add_get("/tokeninfo", self._tokeninfo)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                server = site._server
                assert server is not None
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                self._runner = runner

            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="token-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("token server did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
