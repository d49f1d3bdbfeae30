"""The pages a rep sees when connecting a mailbox: the link's redirect, the callback, the result page.

Routes on the public (tracking) listener:

- ``GET /connect/{token}``: a valid, unused link answers 302 to the provider's
  authorization endpoint; otherwise a page says why not (expired, used, not a link).
- ``GET /connect/callback``: the provider sends the rep back here; the page says which
  mailbox is now connected and what the gateway will read, or what went wrong
  (consent refused, another address than the link's, a state that does not verify...).

Pages are plain HTML with no script, no external resources and no referrer (the link's
token must not travel to anybody in a Referer header), never cached, never framed.
Outcomes are decided in `gateway.accounts.connect`; this module only renders them.
"""

from __future__ import annotations

import html
from typing import Any

import structlog
from aiohttp import web

from gateway.accounts.connect import CALLBACK_PATH, LINK_PATH, Connect, Outcome
from gateway.errors import GatewayError

__all__ = ["add_connect_routes", "render"]

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'none'",
}

_TITLES = {
    "connected": "Mailbox connected",
    "reconnected": "Mailbox reconnected",
    "refused": "Access not granted",
    "expired": "Link expired",
    "used": "Link already used",
    "invalid": "Not a valid link",
    "state_invalid": "Sign-in not recognised",
    "mismatch": "Wrong mailbox",
    "unverified": "Address not verified",
    "failed": "Could not connect",
}

#: HTTP status of each outcome's page
_STATUS = {"connected": 200, "reconnected": 200, "refused": 200, "expired": 410, "used": 410,
           "invalid": 404, "state_invalid": 400, "mismatch": 409, "unverified": 403, "failed": 502}


def _page(title: str, body: str, status: int) -> web.Response:
    doc = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;"
           "max-width:36em;margin:3em auto;padding:0 1em;line-height:1.5;color:#222}"
           "h1{font-size:1.4em}code{background:#f3f3f3;padding:0 .2em}</style></head><body>"
           f"<h1 id=\"title\">{html.escape(title)}</h1>{body}</body></html>")
    return web.Response(text=doc, status=status, content_type="text/html", headers=_HEADERS)


def render(outcome: Outcome) -> web.Response:
    """The page for an outcome (every value escaped)."""
    e = html.escape
    title = _TITLES.get(outcome.kind, "Could not connect")
    parts = [f"<p id=\"outcome\" data-kind=\"{e(outcome.kind)}\">"]
    if outcome.ok:
        verb = "reconnected" if outcome.kind == "reconnected" else "connected"
        folders = ", ".join(outcome.folders) or "none"
        how = ("both ways: mail you receive and mail you send" if outcome.direction == "two-way"
               else "only mail you send through the gateway")
        parts.append(f"Your mailbox <strong id=\"email\">{e(outcome.email or '')}</strong> is {verb}."
                     "</p>")
        parts.append(f"<p>The gateway reads these folders: <span id=\"folders\">{e(folders)}</span>, "
                     f"{e(how)}, and files your conversations with customers in the CRM. It never "
                     "marks mail as read and never deletes anything. It can also send mail as this "
                     "mailbox when you send through the gateway.</p>")
        parts.append("<p>You can close this page.</p>")
    else:
        parts.append(f"{e(outcome.detail)}</p>")
    return _page(title, "".join(parts), _STATUS.get(outcome.kind, 400))


def add_connect_routes(app: web.Application, connect: Connect, *, log: Any = None) -> None:
    """Add the connect pages to the public listener's application (before it starts)."""
    logger = log or structlog.get_logger("mailgw.connect")

    async def callback(request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items()}
        try:
            outcome = await connect.callback(query)
        except GatewayError as exc:
            logger.error("connect_callback_failed", error=str(exc))
            outcome = Outcome("failed", "The gateway could not finish connecting your mailbox; try the "
                                        "link again in a few minutes.")
        logger.info("connect_callback", outcome=outcome.kind, account=outcome.account_id)
        return render(outcome)

    async def open_link(request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        try:
            where, outcome = await connect.begin(token)
        except GatewayError as exc:
            logger.error("connect_link_failed", error=str(exc))
            where, outcome = None, Outcome("failed", "The gateway cannot start connecting right now; "
                                                     "try again in a few minutes.")
        if where is not None:
            raise web.HTTPFound(where, headers=_HEADERS)
        assert outcome is not None
        return render(outcome)

    app.router.add_get(CALLBACK_PATH, callback)
    app.router.add_get(LINK_PATH + "{token}", open_link)
