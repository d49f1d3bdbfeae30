"""The BCC / forward address: verify the sender is ours, find the conversation, store it, deliver nothing.

Reps BCC the ingest address (``ingest.addresses``) on mail they send, or forward a
customer's mail to it. :meth:`Ingest.accept` decides and stores, and raises a
MailError whose reply the SMTP handler passes on:

1. **Who may log mail.** ``ingest.accept_from: users``: the envelope sender and the
   From address must both be one of our users' logins or connected accounts'
   addresses; a list of domains instead: both must be at one of them (or a
   subdomain). Anything else: ``550 5.7.1``.
2. **Is it really them.** Where DNS answers (a DKIM signature, an SPF record),
   DKIM aligned with the From domain or SPF for the envelope domain must pass
   (:mod:`gateway.mail.auth`); a DNS failure is ``451 4.7.0`` (the sender retries),
   a failed check ``550 5.7.1``. When DNS publishes nothing for the domain there is
   nothing to check and the address check decides. Mail the relay accepted from an
   authenticated user skips both steps (``trusted``).
3. **What to store.** A forward (an attached message/rfc822, or an inline Gmail,
   Outlook, Apple Mail or Thunderbird block) is stored as the original message from
   its original sender (:func:`gateway.mail.forward.unwrap_forward`); anything else
   (a BCC copy) as it is. Mail from an address in ``crm.exclude`` is accepted and
   dropped (never stored).
4. **Storing** goes straight to the store, in one transaction; the store deduplicates
   against the relay and IMAP paths. If the store is down: ``451 4.3.0``, so the
   sending server keeps the message and retries; nothing is ever accepted unstored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dns.resolver
import structlog

from gateway.config import Config
from gateway.crm.store import Store
from gateway.errors import PermanentFailure, StoreError, TemporaryFailure
from gateway.ids import new_queue_id
from gateway.mail.addresses import domain_of
from gateway.mail.auth import AuthResult, authenticate
from gateway.mail.forward import unwrap_forward
from gateway.mail.own import OwnAddresses
from gateway.mail.parse import ParsedMessage, parse_message
from gateway.mail.reports import verp_queue_id
from gateway.records import REPORT_KINDS, NewMessage, SourceRef, Stored

#: A report from the null sender up to this size may skip the sender check (see
#: `Ingest._unverified_report`). Parsing and unwrapping always run in a worker thread:
#: a hostile message of any size must not stall the event loop.
THREAD_PARSE_BYTES = 256 * 1024


@dataclass
class IngestSubmission:
    """One message for the ingest address, as the SMTP edge (or the relay) hands it over."""

    mail_from: str
    data: bytes
    client_ip: str = "unknown"
    client_helo: str = ""
    trusted: bool = False          # accepted by the relay from an authenticated user
    user: str | None = None        # that user's login
    rcpts: list[str] = field(default_factory=list)   # the envelope recipients (SMTP edge)


@dataclass(frozen=True)
class IngestResult:
    id: str                        # the ingest id (also the store's source ref)
    message_pk: int | None         # None when the message was excluded and dropped
    created: bool                  # a new message (False: seen on another path already)
    forwarded: str | None          # the forward style when a forward was unwrapped


def _in_domains(address: str, domains: list[str]) -> bool:
    d = domain_of(address) if "@" in address else ""
    return bool(d) and any(d == x.lower() or d.endswith("." + x.lower()) for x in domains)


class Ingest:
    """Accepts mail for the ingest addresses into the CRM store."""

    def __init__(self, get_config: Callable[[], Config], store: Store,
                 resolver: dns.resolver.Resolver, *, log: Any = None) -> None:
        self._get_config = get_config
        self.store = store
        self.resolver = resolver
        self.log = log or structlog.get_logger("mailgw.ingest")

    @property
    def cfg(self) -> Config:
        return self._get_config()

    def is_ingest_address(self, address: str) -> bool:
        return OwnAddresses.of(self.cfg).is_ingest(address)

    def is_bounce_address(self, address: str) -> bool:
        """``delivery.return_path`` itself or one of its VERP addresses."""
        rp = self.cfg.delivery.return_path
        return rp is not None and (address.strip().strip("<>").lower() == rp
                                   or verp_queue_id(address, rp) is not None)

    def accepts(self, address: str) -> bool:
        """RCPT: an ingest address or the bounce address (see :meth:`is_bounce_address`)."""
        return self.is_ingest_address(address) or self.is_bounce_address(address)

    async def accept(self, sub: IngestSubmission) -> IngestResult:
        cfg = self.cfg
        # Parsing, unwrapping and reading a report are CPU work on outside bytes: always
        # in a worker thread, whatever the size (each is linear in it, but a few hundred
        # KB still take milliseconds the SMTP and HTTP edges must not wait for).
        parsed = await asyncio.to_thread(parse_message, sub.data)
        own = OwnAddresses.of(cfg)
        rp = cfg.delivery.return_path
        verp = next((q for r in sub.rcpts if (q := verp_queue_id(r, rp))), None)
        if sub.rcpts and not any(self.is_ingest_address(r) for r in sub.rcpts):
            return await self._accept_report(sub, parsed, verp)
        if not sub.trusted and not await asyncio.to_thread(self._unverified_report, sub, parsed):
            await self._check_sender(sub, parsed, own)
        fwd = await asyncio.to_thread(unwrap_forward, sub.data, parsed)
        msg, raw = (fwd.original, fwd.raw) if fwd is not None else (parsed, sub.data)
        ingest_id = new_queue_id()
        sender = msg.from_addr.lower()
        if sender and self.store.rules.excluded(sender):
            self.log.info("ingest_excluded", ingest_id=ingest_id, sender=sender)
            return IngestResult(ingest_id, None, False, fwd.style if fwd else None)
        forwarder = parsed.from_addr.lower()
        user, account = own.owner(sender) or own.owner(forwarder) or (sub.user, None)
        direction = "outbound" if own.is_user_address(sender) else "inbound"
        now = datetime.now(UTC)
        new = await asyncio.to_thread(
            NewMessage.from_parsed, msg, raw, direction=direction, user=user, account=account,
            sources=[SourceRef("ingest", ingest_id, now, account=account)])
        r = await self._store(new, ingest_id)
        self.log.info("ingested", ingest_id=ingest_id, message=r.id, new=r.created,
                      direction=direction, sender=sender, forwarded=fwd.style if fwd else None,
                      by=forwarder)
        return IngestResult(ingest_id, r.id, r.created, fwd.style if fwd else None)

    async def _store(self, new: NewMessage, ingest_id: str) -> Stored:
        """Store one message synchronously; the store down is ``451 4.3.0`` (the sender retries)."""
        try:
            return (await self.store.store_messages([new]))[0]
        except StoreError as exc:
            self.log.error("ingest_store_failed", ingest_id=ingest_id, error=str(exc))
            raise TemporaryFailure("CRM store unavailable, try again later", code=451,
                                   status="4.3.0") from exc

    @staticmethod
    def _unverified_report(sub: IngestSubmission, parsed: ParsedMessage) -> bool:
        """A report from the null sender naming one of the gateway's queue ids: taken
        without the sender check (a mailbox's redirect rule keeps the null sender), since
        the store records it only against the copy it names, for that copy's recipients.
        Reads the report: call it in a worker thread."""
        if sub.mail_from or len(sub.data) > THREAD_PARSE_BYTES:
            return False
        new = NewMessage.from_parsed(parsed, sub.data, direction="inbound",
                                     sources=[SourceRef("ingest", "-", datetime.now(UTC))])
        return new.report is not None and bool(new.report.queue_ids)

    async def _accept_report(self, sub: IngestSubmission, parsed: ParsedMessage,
                             queue_id: str | None) -> IngestResult:
        """Mail to the bounce address: a report is recorded on the copy it names (no sender
        check: reports come from any server, from the null sender); anything else is refused."""
        ingest_id = new_queue_id()
        new = await asyncio.to_thread(
            NewMessage.from_parsed, parsed, sub.data, direction="inbound",
            sources=[SourceRef("ingest", ingest_id, datetime.now(UTC))])
        if new.report is None or new.kind not in REPORT_KINDS:
            self.log.info("bounce_address_refused", ingest_id=ingest_id, kind=new.kind,
                          mail_from=sub.mail_from, peer=sub.client_ip)
            raise PermanentFailure("This address only takes delivery reports", code=550,
                                   status="5.7.1")
        new.bounce_queue_id = queue_id
        r = await self._store(new, ingest_id)
        self.log.info("report_ingested", ingest_id=ingest_id, report=new.report.type,
                      queue_id=queue_id, message=r.id or None)
        return IngestResult(ingest_id, r.id or None, False, None)

    async def _check_sender(self, sub: IngestSubmission, parsed: ParsedMessage,
                            own: OwnAddresses) -> None:
        cfg = self.cfg
        env, hdr = sub.mail_from.lower(), parsed.from_addr.lower()
        if cfg.ingest.accept_from == "users":
            ok = own.is_user_address(env) and own.is_user_address(hdr)
        else:
            ok = _in_domains(env, cfg.ingest.accept_from) and _in_domains(hdr, cfg.ingest.accept_from)
        if not ok:
            self.log.warning("ingest_refused", reason="not one of ours", mail_from=env, from_=hdr,
                             peer=sub.client_ip)
            raise PermanentFailure("Sender not allowed to log mail here", code=550, status="5.7.1")
        result: AuthResult = await authenticate(
            sub.data, from_domain=domain_of(hdr), mail_from=sub.mail_from,
            client_ip=sub.client_ip, helo=sub.client_helo, resolver=self.resolver)
        if result.passed or result.unanswered:
            self.log.info("ingest_sender_verified", mail_from=env, dkim=result.dkim,
                          spf=result.spf, reason=result.reason)
            return
        if result.temporary:
            self.log.warning("ingest_sender_unverifiable", mail_from=env, reason=result.reason)
            raise TemporaryFailure("Cannot verify the sender now (DNS), try again later",
                                   code=451, status="4.7.0")
        self.log.warning("ingest_refused", reason=result.reason, dkim=result.dkim, spf=result.spf,
                         mail_from=env, peer=sub.client_ip)
        raise PermanentFailure("Sender verification failed (DKIM/SPF)", code=550, status="5.7.1")
