"""The ingest listener's aiosmtpd handler: mail for the BCC / forward address in, `Ingest` calls out.

MX-facing, so no AUTH: RCPT accepts only the configured ingest addresses and, with
``delivery.return_path``, the bounce address and its VERP addresses (anything else is
`550 5.1.1`, this is no relay), DATA hands the message to
:class:`gateway.ingest.Ingest`, which decides who may log mail and stores it; its
MailError carries the reply. Anything unexpected becomes `451 4.3.0`, never a 250.
"""

from __future__ import annotations

from typing import Any

import structlog

from gateway.errors import MailError
from gateway.ingest import Ingest, IngestSubmission
from gateway.mail.addresses import relay_trick
from gateway.smtp.session import BARE_NEWLINE_REPLY, ehlo_reply, has_bare_newline, peer_ip


class IngestHandler:
    """aiosmtpd handler for the ingest listener."""

    def __init__(self, ingest: Ingest, *, max_recipients: int, log: Any = None) -> None:
        self.ingest = ingest
        self.max_recipients = max_recipients
        self.log = log or structlog.get_logger("mailgw.smtp.ingest")

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        return ehlo_reply(session, hostname, responses)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if address in ("", "<>"):
            # the null reverse-path of bounces and reports (RFC 5321 4.5.5): aiosmtpd
            # hands it over as "<>", which also keeps its "MAIL first" check satisfied
            address = "<>"
        elif relay_trick(address):
            return f"553 5.1.7 Sender address rejected: {relay_trick(address)}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.ingest.accepts(address):
            return "550 5.1.1 No such recipient here (this address only logs mail to the CRM)"
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or b""
        peer = peer_ip(session)
        if has_bare_newline(data):
            self.log.warning("bare_newline_rejected", peer=peer, listener="ingest")
            return BARE_NEWLINE_REPLY
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        sub = IngestSubmission(mail_from=mail_from, data=data, client_ip=peer,
                               client_helo=session.host_name or "", rcpts=list(envelope.rcpt_tos))
        try:
            result = await self.ingest.accept(sub)
        except MailError as exc:
            self.log.warning("ingest_refused_reply", peer=peer, reply=exc.smtp_reply())
            return exc.smtp_reply()
        except Exception:
            self.log.exception("ingest_failed", peer=peer)
            return "451 4.3.0 Local error in processing, try again later"
        return f"250 2.0.0 Ok: logged as {result.id}"
