"""A real webhook receiver on loopback (aiohttp): scripted answers, signature checks, dedupe by id."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.api.webhooks import verify


@dataclass
class Attempt:
    delivery: str
    event: str
    timestamp: str
    signature: str
    body: bytes
    signed_ok: bool
    status: int

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """Answers POST / with the next status of `statuses` (then 200); processes each delivery
    id once, as a receiver following the documented recipe would."""

    secret: bytes
    statuses: list[int] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)
    hold: asyncio.Event | None = None     # when set (not None), requests wait until it is set
    arrived: int = 0                       # requests received, answered or not
    port: int = 0
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrived += 1
        if self.hold is not None:
            await self.hold.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        h = request.headers
        a = Attempt(delivery=h.get("X-Mailgw-Delivery", ""), event=h.get("X-Mailgw-Event", ""),
                    timestamp=h.get("X-Mailgw-Timestamp", ""),
                    signature=h.get("X-Mailgw-Signature", ""), body=body,
                    signed_ok=verify(self.secret, h.get("X-Mailgw-Timestamp", ""), body,
                                     h.get("X-Mailgw-Signature", "")),
                    status=status)
        self.attempts.append(a)
        if status == 200 and a.signed_ok and a.delivery not in self.processed:
            self.processed[a.delivery] = a.payload
        return web.Response(status=status, text="ok" if status == 200 else "nope")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()  # 0: any free port
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
