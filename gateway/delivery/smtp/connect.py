"""Open one outbound SMTP connection: connect (plain or implicit TLS), read the
greeting, EHLO (HELO when refused), STARTTLS and AUTH as the `Destination` asks, with
every failure labelled on the spot (see `gateway.delivery.smtp` for the table).

AUTH with an OAuth 2.0 bearer token (`Destination.mechanism`: XOAUTH2, or RFC 7628
OAUTHBEARER) goes::

    AUTH XOAUTH2 <base64 initial response>     (token from dest.token())
    235 ............................................. logged in
    535, or 334 <error challenge> / "" / 5xx ....... refused: dest.token(rejected=token),
                                                     AUTH once more on the same session
    refused again, or the grant refused ............ 454 4.7.8 "<account> needs reconnecting"
                                                     (RcptResult.credentials "refused")
    token endpoint unreachable ..................... 451 4.7.0, retried later
    any other reply ................................ 454 4.7.0 (4xx: a temporary failure)
"""

from __future__ import annotations

import asyncio
import base64
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
from gateway.delivery.transport import Destination, parse_reply, reply_line, token_error_reply
from gateway.errors import AccountError
from gateway.oauth.sasl import MECHANISMS, initial_response

_log = logging.getLogger("gateway.delivery.transport")  # one logger for the whole client

#: Password mechanisms in the order they are chosen; one of them is tried per connection.
#: PLAIN first: every server that takes passwords has it, and over TLS it is as safe as
#: any; CRAM-MD5 (historic, RFC 8314 recommends TLS + PLAIN) only when nothing else is.
PASSWORD_MECHANISMS = ("plain", "login", "cram-md5")


class NoPasswordMechanism(Exception):
    """The server offers no password mechanism of PASSWORD_MECHANISMS."""


class PasswordRefused(Exception):
    """The server refused the login: its reply (`response`) to AUTH `mechanism`."""

    def __init__(self, mechanism: str, response: SMTPResponseException) -> None:
        super().__init__(f"AUTH {mechanism}: {response.code} {response.message}")
        self.mechanism = mechanism
        self.response = response


async def password_login(smtp: SMTP, user: str, password: str, *, timeout: float | None,
                         remote: str = "") -> str:
    """Log in with a password using one mechanism, the first of PASSWORD_MECHANISMS the
    server offers, and return it ("PLAIN"). A refusal (535) ends it: trying the next
    mechanism with the same password would only count one more failure toward the
    provider's lockout (aiosmtplib's ``login()`` tries them all). Only a server that turns
    out not to support the mechanism it offered (504, 534) gets the next one.

    Raises :class:`NoPasswordMechanism` or :class:`PasswordRefused`."""
    offered = [m for m in PASSWORD_MECHANISMS if m in smtp.server_auth_methods]
    if not offered:
        shown = " ".join(m.upper() for m in smtp.server_auth_methods) or "nothing"
        raise NoPasswordMechanism(f"it offers no password mechanism we use (it offers {shown})")
    for i, mech in enumerate(offered):
        method = getattr(smtp, f"auth_{mech.replace('-', '')}")
        try:
            await method(user, password, timeout=timeout)
            return mech.upper()
        except SMTPResponseException as exc:
            if exc.code in (504, 534) and i + 1 < len(offered) and smtp.is_connected:
                _log.info("%s does not take AUTH %s after all (%s %s); trying %s",
                          remote, mech.upper(), exc.code, exc.message, offered[i + 1].upper())
                continue
            raise PasswordRefused(mech.upper(), exc) from None
    raise AssertionError("unreachable: the last mechanism returns or raises")


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
            if dest.mechanism is not None:
                await self._oauth_login(smtp, dest, remote)
            elif dest.username is not None:
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
        """Log in with a password (:func:`password_login`: one mechanism). The upstream's
        reply, enhanced status code included, is kept in the recorded reply."""
        user = dest.username or ""
        if not smtp.supports_extension("auth"):
            raise Failure(454, "4.7.0", f"host {remote} offers no AUTH (to log in as {user})",
                          remote=remote)
        try:
            await password_login(smtp, user, dest.password or "", timeout=self.command_timeout,
                                 remote=remote)
        except NoPasswordMechanism as exc:
            raise Failure(454, "4.7.0", f"cannot log in as {user} at {remote}: {exc}",
                          remote=remote) from None
        except PasswordRefused as exc:
            status = "4.7.8" if isinstance(exc.response, SMTPAuthenticationError) else "4.7.0"
            raise Failure(454, status, f"authentication as {user} (AUTH {exc.mechanism}) "
                          f"failed at {remote}: {_upstream_reply(exc.response)}",
                          remote=remote) from None

    async def _oauth_login(self, smtp: SMTP, dest: Destination, remote: str) -> None:
        """AUTH XOAUTH2/OAUTHBEARER; one fresh token and one more try after a refusal."""
        assert dest.mechanism is not None and dest.username is not None
        mech = MECHANISMS[dest.mechanism]
        user = dest.username
        if not smtp.supports_extension("auth"):
            raise Failure(454, "4.7.0", f"host {remote} offers no AUTH (to log in as {user} "
                          f"with {mech})", remote=remote)
        if mech.lower() not in smtp.server_auth_methods:
            offered = " ".join(m.upper() for m in smtp.server_auth_methods) or "nothing"
            raise Failure(454, "4.7.0", f"host {remote} does not offer AUTH {mech} (to log "
                          f"in as {user}); it offers {offered}", remote=remote)
        token = await self._token(dest, remote, rejected=None)
        refusal = await self._sasl(smtp, dest, mech, token, remote)
        if refusal is None:
            return
        _log.info("%s refused %s as %s (%s); trying once more with a fresh token",
                  remote, mech, user, refusal)
        token = await self._token(dest, remote, rejected=token)
        refusal = await self._sasl(smtp, dest, mech, token, remote)
        if refusal is None:
            return
        raise Failure(454, "4.7.8", f"{dest.who} needs reconnecting: host {remote} refused "
                      f"AUTH {mech} as {user} with a fresh token: {refusal}", remote=remote,
                      credentials="refused")

    @staticmethod
    async def _token(dest: Destination, remote: str, *, rejected: str | None) -> str:
        assert dest.token is not None
        try:
            return await dest.token(rejected=rejected)
        except AccountError as exc:
            code, status, text, trouble = token_error_reply(dest, exc)
            raise Failure(code, status, text, remote=remote, credentials=trouble) from None

    async def _sasl(self, smtp: SMTP, dest: Destination, mech: str, token: str,
                    remote: str) -> str | None:
        """One AUTH exchange: None when logged in, the reply when the token was refused;
        Failure for any other answer."""
        assert dest.username is not None
        first = initial_response(mech, dest.username, token, dest.host, dest.port)
        resp = await smtp.execute_command(b"AUTH", mech.encode("ascii"), base64.b64encode(first),
                                          timeout=self.command_timeout)
        challenged = resp.code == 334
        if challenged:
            # the error challenge (RFC 7628 3.2.2, Google's XOAUTH2): answer it to get the
            # final reply; OAUTHBEARER's dummy response is a single ^A
            dummy = b"AQ==" if mech == "OAUTHBEARER" else b""
            resp = await smtp.execute_command(dummy, timeout=self.command_timeout)
        if resp.code == 235:
            return None
        code, status, text = parse_reply(resp.code, resp.message)
        reply = f"{resp.code} {status} {text}".rstrip()
        if resp.code == 535 or (challenged and 500 <= resp.code < 600):
            return reply
        why = "failed for now" if 400 <= code < 500 else "failed"
        raise Failure(454, "4.7.0", f"AUTH {mech} as {dest.username} {why} at {remote}: "
                      f"{reply}", remote=remote)


def _upstream_reply(exc: SMTPResponseException) -> str:
    """The server's reply as it gave it, on one line: "535 5.7.8 Authentication failed"
    (the enhanced status code kept, none made up when it gave none)."""
    return reply_line(f"{exc.code} {' '.join(exc.message.splitlines())}")


def _helo_failure(remote: str, verb: str, exc: SMTPResponseException) -> Failure:
    code, status, text = parse_reply(exc.code, exc.message)
    return Failure(code, status, f"host {remote} refused {verb}: {exc.code} {text}",
                   remote=remote, next_mx=code // 100 == 4)
