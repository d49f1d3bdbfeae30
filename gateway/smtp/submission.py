"""The submission listener's aiosmtpd handler: SMTP verbs in, relay calls out, replies back.

It only translates. Who may relay (SMTP AUTH users, `trusted_networks`) and which
addresses are acceptable are decided here because they are protocol questions;
what happens to an accepted message is `gateway.relay`'s job. Every MailError
carries its own reply code; anything unexpected becomes `451 4.3.0` (never a 250).
"""

from __future__ import annotations

import ipaddress
from base64 import b64decode
from collections.abc import Callable
from typing import Any

import structlog

from gateway.config import Config, SubmissionListener
from gateway.crm.counters import SendCounts
from gateway.crm.suppression import SuppressionList
from gateway.errors import MailError, StoreError
from gateway.mail.addresses import relay_trick
from gateway.mail.own import OwnAddresses
from gateway.passwords import PasswordChecker
from gateway.policy import PolicySet
from gateway.relay import Relay, Submission
from gateway.smtp.aiosmtpd_compat import tls_active
from gateway.smtp.protocol import AuthResult, Limiter, LoginPassword
from gateway.smtp.session import BARE_NEWLINE_REPLY, ehlo_reply, has_bare_newline, peer_ip


class SubmissionHandler:
    """aiosmtpd handler for the submission listener."""

    def __init__(self, get_config: Callable[[], Config], relay: Relay,
                 passwords: PasswordChecker, limiter: Limiter,
                 log: Any = None, *, policies: Callable[[], PolicySet] | None = None,
                 counts: SendCounts | None = None,
                 suppressions: SuppressionList | None = None) -> None:
        self._get_config = get_config
        self.relay = relay
        self.passwords = passwords
        self.limiter = limiter
        self.policies = policies
        self.counts = counts
        self.suppressions = suppressions
        self.log = log or structlog.get_logger("mailgw.smtp")

    @property
    def cfg(self) -> Config:
        return self._get_config()

    @property
    def listener(self) -> SubmissionListener:
        sub = self.cfg.listeners.submission
        assert sub is not None
        return sub

    def _trusted(self, session: Any) -> bool:
        try:
            ip = ipaddress.ip_address(peer_ip(session))
        except ValueError:
            return False
        return any(ip in net for net in self.listener.trusted_networks)

    def _may_relay(self, session: Any) -> bool:
        return bool(session.authenticated) or self._trusted(session)

    # -- EHLO ------------------------------------------------------------------------
    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        return ehlo_reply(session, hostname, responses)

    # -- AUTH (async, verified off the loop, limited per IP) -------------------------
    async def _authenticate(self, server: Any, login_b: bytes, password_b: bytes,
                            mechanism: str) -> AuthResult:
        ip = peer_ip(server.session)
        if await self.limiter.is_blocked(ip):
            self.log.warning("auth_blocked", peer=ip, mechanism=mechanism)
            await server.push("421 4.7.0 Too many failed authentication attempts, try later")
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        login = login_b.decode("utf-8", "replace")
        password = password_b.decode("utf-8", "surrogateescape")
        user = self.cfg.user(login)
        ok = await self.passwords.check(login, password,
                                        user.password_hash if user else None)
        if ok and user is not None:
            await self.limiter.record_success(ip)
            self.log.info("auth_ok", peer=ip, user=user.login, mechanism=mechanism)
            return AuthResult(success=True, auth_data=LoginPassword(user.login.encode(),
                                                                    b""))
        await self.limiter.record_failure(ip)
        self.log.warning("auth_failed", peer=ip, login=login[:100], mechanism=mechanism)
        return AuthResult(success=False, handled=False)

    @staticmethod
    async def _initial_response(server: Any, args: list[str], challenge: str) -> bytes | None:
        """The client's first SASL response: inline after the mechanism, or asked for with
        `challenge`. None when the client aborted or sent bad base64 (already answered)."""
        if len(args) == 1:
            blob = await server.challenge_auth(challenge)
            return blob if isinstance(blob, bytes) else None
        try:
            return b64decode(args[1].encode(), validate=True)
        except ValueError:
            await server.push("501 5.5.2 Can't decode base64")
            return None

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        blob = await self._initial_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            await server.push("535 5.7.8 Authorization identity not permitted")
            await self.limiter.record_failure(peer_ip(server.session))
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password, "PLAIN")

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        login = await self._initial_response(server, args, server.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password, "LOGIN")

    # -- MAIL / RCPT -----------------------------------------------------------------
    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if not self._may_relay(session):
            return "530 5.7.0 Authentication required"
        if address:
            why = relay_trick(address)
            if why:
                return f"553 5.1.7 Sender address rejected: {why}"
        if session.authenticated:
            login = session.auth_data.login.decode() if session.auth_data else ""
            allowed = OwnAddresses.of(self.cfg).sender_addresses(login)
            if address and address.lower() not in allowed:
                return "553 5.7.1 Sender address rejected: not owned by the authenticated user"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if not self._may_relay(session):
            return "554 5.7.1 Relay access denied"
        why = relay_trick(address)
        if why:
            return f"554 5.7.1 Relay access denied: {why}"
        if len(envelope.rcpt_tos) >= self.listener.max_recipients:
            return "452 4.5.3 Too many recipients"
        if rcpt_options:
            return "555 5.5.4 RCPT parameters not supported"
        refused = (await self._over_daily_cap(session, envelope, address)
                   or await self._suppressed(session, envelope, address))
        if refused:
            return refused
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def _over_daily_cap(self, session: Any, envelope: Any, address: str) -> str | None:
        """`max_per_day` (a policy): 452 4.5.3 once the sender's recipients today reach it."""
        is_ingest = self.relay.is_ingest
        if self.policies is None or self.counts is None or (is_ingest and is_ingest(address)):
            return None   # the gateway's own ingest address is no send (relay counts alike)
        sender = envelope.mail_from or ""
        login = session.auth_data.login.decode() if session.authenticated and session.auth_data \
            else None
        user = self.cfg.user(login) if login else None
        cap = self.policies().decide(sender, address, user.login if user else None,
                                     user.account if user else None).settings.max_per_day
        if cap is None:
            return None
        try:
            sent = await self.counts.today(sender)
        except StoreError as exc:
            self.log.error("daily_cap_unknown", sender=sender, error=str(exc))
            return "451 4.3.0 Cannot check the daily sending limit now, try again later"
        remote = [r for r in envelope.rcpt_tos if not (is_ingest and is_ingest(r))]
        if sent + len(remote) >= cap:
            self.log.warning("daily_cap_reached", sender=sender, cap=cap, sent=sent)
            return f"452 4.5.3 Daily sending limit of {cap} recipients reached for {sender}"
        return None

    async def _suppressed(self, session: Any, envelope: Any, address: str) -> str | None:
        """The `suppressed: refuse` policy: 550 5.1.1 for an address on the suppression list."""
        is_ingest = self.relay.is_ingest
        if self.policies is None or self.suppressions is None or (is_ingest and is_ingest(address)):
            return None
        login = session.auth_data.login.decode() if session.authenticated and session.auth_data \
            else None
        user = self.cfg.user(login) if login else None
        mode = self.policies().decide(envelope.mail_from or "", address,
                                      user.login if user else None,
                                      user.account if user else None).settings.suppressed
        if mode != "refuse":
            return None       # `record`: delivered; the store marks its queued event
        try:
            reason = await self.suppressions.reason(address)
        except StoreError as exc:
            self.log.error("suppression_unknown", rcpt=address, error=str(exc))
            return "451 4.3.0 Cannot check the suppression list now, try again later"
        if reason is None:
            return None
        self.log.info("rcpt_suppressed", rcpt=address, reason=reason)
        return (f"550 5.1.1 <{address}>: recipient is on the suppression list ({reason}); "
                "not sent")

    # -- DATA ------------------------------------------------------------------------
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or b""
        peer = peer_ip(session)
        if has_bare_newline(data):
            self.log.warning("bare_newline_rejected", peer=peer)
            return BARE_NEWLINE_REPLY
        login = session.auth_data.login.decode() if session.authenticated and session.auth_data \
            else None
        user = self.cfg.user(login) if login else None
        sub = Submission(
            mail_from=envelope.mail_from or "",
            rcpts=list(envelope.rcpt_tos),
            data=data,
            client_ip=peer,
            client_helo=session.host_name,
            user=user.login if user else None,
            account=user.account if user else None,
            tls=tls_active(server),
            esmtp=bool(session.extended_smtp),
        )
        try:
            qid = await self.relay.accept(sub)
        except MailError as exc:
            self.log.warning("message_refused", peer=peer, reply=exc.smtp_reply())
            return exc.smtp_reply()
        except Exception:
            self.log.exception("accept_failed", peer=peer)
            return "451 4.3.0 Local error in processing, try again later"
        self.log.info("queued", queue_id=qid, peer=peer, user=sub.user,
                      mail_from=sub.mail_from, rcpts=len(sub.rcpts), size=len(data))
        return f"250 2.0.0 Ok: queued as {qid}"
