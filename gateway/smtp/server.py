"""One SMTP listening socket: TLS set-up, the protocol factory, start and graceful stop."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from gateway.config import Config, SMTPListenerBase, SubmissionListener
from gateway.smtp.protocol import GatewaySMTP


def auth_requires_tls(lst: SMTPListenerBase) -> bool:
    """aiosmtpd's `auth_require_tls`: hide AUTH from EHLO and answer it `538 5.7.11` until
    STARTTLS. Always on a STARTTLS listener (loopback too: where TLS is on offer a password
    never crosses in clear); on a plain one unless it binds loopback only. Off with implicit
    TLS: the session is encrypted from the first byte, and aiosmtpd's check looks at
    STARTTLS alone, so it would refuse AUTH there."""
    if lst.tls == "starttls":
        return True
    if lst.tls == "implicit":
        return False
    return not lst.loopback_only


def server_tls_context(cfg: Config, lst: SMTPListenerBase) -> ssl.SSLContext | None:
    if lst.tls == "none":
        return None
    assert lst.cert_file and lst.key_file
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.path(lst.cert_file)), str(cfg.path(lst.key_file)))
    return ctx


class SMTPListener:
    """Binds host:port and serves `handler` with GatewaySMTP sessions."""

    def __init__(self, name: str, cfg: Config, lst: SMTPListenerBase, handler: Any, *,
                 reuse_port: bool = False) -> None:
        self.name = name
        #: SO_REUSEPORT: every worker process binds the same port, the kernel spreads accepts
        self.reuse_port = reuse_port
        self.cfg = cfg
        self.lst = lst
        self.handler = handler
        self.active: set[GatewaySMTP] = set()
        self.server: asyncio.Server | None = None
        self.tls = server_tls_context(cfg, lst)

    def _factory(self) -> GatewaySMTP:
        lst = self.lst
        return GatewaySMTP(
            self.handler,
            active=self.active,
            max_connections=lst.max_connections,
            session_deadline=max(lst.timeout * 6, 600.0),
            hostname=self.cfg.hostname,
            ident="mailgw ESMTP",
            data_size_limit=lst.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self.tls if lst.tls == "starttls" else None,
            require_starttls=lst.starttls_required,
            timeout=lst.timeout,
            auth_required=False,
            auth_require_tls=auth_requires_tls(lst),
            # AUTH is the submission listener's alone: elsewhere no mechanism is offered
            auth_exclude_mechanism=None if isinstance(lst, SubmissionListener) else ["LOGIN", "PLAIN"],
            command_call_limit=lst.max_commands,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._factory, host=self.lst.host, port=self.lst.port,
            ssl=self.tls if self.lst.tls == "implicit" else None,
            reuse_address=True, reuse_port=self.reuse_port or None, start_serving=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting; give sessions `grace` seconds to finish, then close them."""
        if self.server is None:
            return
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.active:
            # Idle sessions go at once; a transaction under way gets until the deadline.
            late = loop.time() >= deadline
            for proto in list(self.active):
                env = getattr(proto, "envelope", None)
                idle = env is None or env.mail_from is None
                if (idle or late) and isinstance(proto.transport, asyncio.WriteTransport):
                    if not proto.transport.is_closing():
                        try:
                            proto.transport.write(b"421 4.3.2 Service shutting down\r\n")
                        except (AttributeError, OSError):
                            pass   # a TLS session the client just left: its SSL layer is gone
                    proto.transport.close()
                    self.active.discard(proto)
            if late:
                break
            await asyncio.sleep(0.05)
        self.server = None
