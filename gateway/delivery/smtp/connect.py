"""Open one outbound SMTP connection: connect (plain or implicit TLS), read the
greeting, EHLO (HELO when refused), STARTTLS and AUTH as the `Destination` asks, with
every failure labelled on the spot (see `gateway.delivery.smtp` for the table)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from gateway.delivery.smtp.failures import Failure, TLSFailure, errno_text, tls_cause
from gateway.delivery.smtp.pool import Counters, quit_smtp
from gateway.delivery.smtp.tls import TLSContexts
from gateway.delivery.transport import Destination, parse_reply

_log = logging.getLogger("gateway.delivery.transport")  # one logger for the whole client


class Connector:
    """Opens connections for the transport; `open()` returns the session and the
    "host[ip]:port" it reached."""

    def __init__(self, helo: str, *, connect_timeout: float, command_timeout: float,
                 counters: Counters) -> None:
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.counters = counters
        self.tls_contexts = TLSContexts()

    async def open(self, dest: Destination, *, starttls: bool = True) -> tuple[SMTP, str]:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as `dest` asks."""
        where = dest.where
        wants_tls = dest.tls != "none" and (starttls or dest.tls == "implicit")
        ctx = await self.tls_contexts.get(dest) if wants_tls else None
        smtp = await self._connect(dest, ctx)
        self.counters.opened += 1
        remote = self._remote(smtp, dest)
        try:
            await self.ehlo(smtp, remote)
            if dest.tls in ("starttls", "opportunistic") and starttls:
                assert ctx is not None
                await self._starttls(smtp, dest, remote, ctx)
            if dest.username is not None:
                await self._login(smtp, dest, remote)
        except Failure:
            await quit_smtp(smtp, min(5.0, self.command_timeout))
            raise
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            smtp.close()
            why = "timed out" if isinstance(exc, TimeoutError) else "lost connection"
            raise Failure(451, "4.4.2", f"{why} with {remote} during the session set-up "
                          f"({errno_text(exc)})", next_mx=True) from None
        except BaseException:
            smtp.close()
            raise
        _log.debug("connected to %s (%s)", remote, where)
        return smtp, remote

    async def _connect(self, dest: Destination, ctx: ssl.SSLContext | None) -> SMTP:
        where = dest.where
        implicit = dest.tls == "implicit"
        smtp: SMTP
        if implicit and dest.address and dest.address != dest.host:
            # aiosmtplib takes the TLS server name from `hostname`; connect the socket
            # ourselves so that SNI and the certificate check use the name, not the address.
            sock = await self._tcp_connect(dest)
            smtp = SMTP(hostname=dest.host, sock=sock, local_hostname=self.helo,
                        timeout=self.command_timeout, use_tls=True, start_tls=False,
                        tls_context=ctx)
        else:
            smtp = SMTP(hostname=dest.address or dest.host, port=dest.port,
                        local_hostname=self.helo, timeout=self.command_timeout,
                        use_tls=implicit, start_tls=False, tls_context=ctx)
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except SMTPConnectResponseError as exc:
            code, status, text = parse_reply(exc.code, exc.message)
            if code // 100 != 4:  # a 5xx greeting: try elsewhere / later (Postfix default)
                code, status = 451, "4" + status[1:]
            raise Failure(code, status, f"host {where} refused to talk to me: "
                          f"{exc.code} {text}", next_mx=True) from None
        except SMTPConnectTimeoutError:
            raise Failure(451, "4.4.1", f"connect to {where}: timed out",
                          next_mx=True) from None
        except (SMTPException, OSError) as exc:
            if implicit and tls_cause(exc) is not None:
                raise TLSFailure(451, "4.7.5", f"TLS with {where} failed: {errno_text(exc)}",
                                 next_mx=True) from None
            raise Failure(451, "4.4.1", f"connect to {where}: {errno_text(exc)}",
                          next_mx=True) from None
        return smtp

    async def _tcp_connect(self, dest: Destination) -> socket.socket:
        assert dest.address is not None
        try:
            family = (socket.AF_INET6 if ipaddress.ip_address(dest.address).version == 6
                      else socket.AF_INET)
        except ValueError:
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (dest.address, dest.port)),
                self.connect_timeout)
        except TimeoutError:
            sock.close()
            raise Failure(451, "4.4.1", f"connect to {dest.where}: timed out",
                          next_mx=True) from None
        except OSError as exc:
            sock.close()
            raise Failure(451, "4.4.1", f"connect to {dest.where}: {errno_text(exc)}",
                          next_mx=True) from None
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _remote(smtp: SMTP, dest: Destination) -> str:
        try:
            peer = smtp.get_transport_info("peername")
        except SMTPException:
            peer = None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{dest.host}[{peer[0]}]:{peer[1]}"
        return dest.where

    async def ehlo(self, smtp: SMTP, remote: str) -> None:
        """EHLO, or HELO when EHLO is refused and the server is still there."""
        try:
            await smtp.ehlo()
            return
        except SMTPHeloError as exc:
            if not smtp.is_connected:
                raise _helo_failure(remote, "EHLO", exc) from None
        try:
            await smtp.helo()
        except SMTPHeloError as exc:
            raise _helo_failure(remote, "HELO", exc) from None

    async def _starttls(self, smtp: SMTP, dest: Destination, remote: str,
                        ctx: ssl.SSLContext) -> None:
        required = dest.tls == "starttls" and dest.tls_required
        if not smtp.supports_extension("starttls"):
            if required:
                raise Failure(451, "4.7.4", f"TLS is required, but was not offered by host "
                              f"{remote}", next_mx=True)
            return
        try:
            await smtp.starttls(server_hostname=dest.host, tls_context=ctx,
                                timeout=self.command_timeout)
        except SMTPResponseException as exc:  # e.g. 454 TLS not available
            if required or not smtp.is_connected:
                _, _, text = parse_reply(exc.code, exc.message)
                raise TLSFailure(451, "4.7.5", f"host {remote} refused STARTTLS: "
                                 f"{exc.code} {text}", next_mx=True) from None
            return  # STARTTLS is optional here: carry on in plaintext
        except (ssl.SSLError, ssl.CertificateError, SMTPServerDisconnected, SMTPTimeoutError,
                OSError) as exc:
            smtp.close()
            raise TLSFailure(451, "4.7.5", f"TLS handshake with {remote} failed: "
                             f"{errno_text(exc)}", next_mx=True) from None
        await self.ehlo(smtp, remote)  # RFC 3207: forget what was said before TLS

    async def _login(self, smtp: SMTP, dest: Destination, remote: str) -> None:
        user = dest.username or ""
        if not smtp.supports_extension("auth"):
            raise Failure(454, "4.7.0", f"host {remote} offers no AUTH (to log in as {user})",
                          remote=remote)
        try:
            await smtp.login(user, dest.password or "")
        except SMTPResponseException as exc:
            _, _, text = parse_reply(exc.code, exc.message)
            status = "4.7.8" if isinstance(exc, SMTPAuthenticationError) else "4.7.0"
            raise Failure(454, status, f"authentication as {user} failed at {remote}: "
                          f"{exc.code} {text}", remote=remote) from None
        except SMTPServerDisconnected:
            raise
        except SMTPException as exc:  # no common mechanism
            raise Failure(454, "4.7.0", f"cannot log in as {user} at {remote}: {exc}",
                          remote=remote) from None


def _helo_failure(remote: str, verb: str, exc: SMTPResponseException) -> Failure:
    code, status, text = parse_reply(exc.code, exc.message)
    return Failure(code, status, f"host {remote} refused {verb}: {exc.code} {text}",
                   remote=remote, next_mx=code // 100 == 4)
