"""One mail transaction on an open connection: MAIL FROM, RCPT TO for each recipient,
DATA, pipelined when the server offers it and sequential otherwise, with the same results.

A transaction that ended with the reply to the message (or to a refused MAIL FROM)
leaves the server in its initial state (RFC 5321 4.1.4), so the next one on the
connection starts with MAIL FROM at once (`Conn.clean`); any other ending (every
recipient refused, DATA refused) is cleared with RSET first. A reused connection that
turns out dead (RSET or MAIL FROM fails with 421 or a disconnect, before any recipient
was answered) raises `Stale`, for the caller to replace it once. A connection lost
during or after DATA is never retried here: the server may have taken the message.
"""

from __future__ import annotations

from aiosmtplib import (
    SMTP,
    SMTPDataError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from gateway.delivery import aiosmtplib_compat as compat
from gateway.delivery.smtp import pipelining
from gateway.delivery.smtp.failures import Failure, Outcome, Stale, errno_text
from gateway.delivery.smtp.pool import Conn, Counters
from gateway.delivery.transport import RcptResult, parse_reply, reply_line
from gateway.mail.headers import header_block
from gateway.mail.wire import has_bare_newline


async def run(conn: Conn, mail_from: str, rcpts: list[str], data: bytes, *, reused: bool,
              timeout: float, counters: Counters) -> Outcome:
    """MAIL, RCPT..., DATA on an open connection; `conn.keep` says afterwards whether the
    connection is fit for the pool. Raises `Stale` when a reused connection was dead."""
    smtp = conn.smtp
    remote = conn.remote
    results: dict[int, RcptResult] = {}
    accepted: list[int] = []
    stage = "RSET"
    answered = False  # some recipient got a definite reply
    keep = False
    next_mx = False
    was_clean, conn.clean = conn.clean, False
    unproven = reused and was_clean  # counted as reused once MAIL FROM gets an answer
    try:
        if reused and not was_clean:
            try:
                await smtp.rset()
            except SMTPResponseException:
                raise Stale() from None
            counters.reused += 1
        try:
            options, encoding = _mail_options(smtp, remote, mail_from, rcpts, data)
        except Failure as exc:
            keep = conn.clean = True
            counters.reused += unproven
            return exc.outcome(rcpts)
        replies = pipelining.start(smtp, mail_from, rcpts, data, options, encoding)
        if replies is not None:
            counters.pipelined += 1
            # MAIL, every RCPT and DATA went out in one write (RFC 2920); their replies
            # are read in order below, exactly as the sequential branch would see them
            try:
                stage = "MAIL FROM"
                code, message = await replies.next(timeout)
                if code != 250:
                    if reused and code == 421:
                        raise Stale()
                    counters.reused += unproven
                    refused = parse_reply(code, message)
                    try:  # the refusal is the answer; the rest only decides reuse
                        keep = code != 421 and await replies.finish(
                            len(rcpts) + 1, timeout)
                    except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
                        keep = False
                    return Outcome([RcptResult(r, *refused, remote) for r in rcpts],
                                    next_mx=refused[0] // 100 == 4)
                counters.reused += unproven
                stage = "RCPT TO"
                for i, rcpt in enumerate(rcpts):
                    code, message = await replies.next(timeout)
                    if code == 421:  # the server is closing the session
                        if reused and not answered:
                            raise Stale()
                        for j in range(len(rcpts)):
                            if j not in results or j in accepted:
                                results[j] = RcptResult.from_reply(rcpts[j], code, message,
                                                                   remote)
                        accepted.clear()
                        return _outcome(rcpts, results)
                    if code in (250, 251):
                        accepted.append(i)
                    else:
                        results[i] = RcptResult.from_reply(rcpt, code, message, remote)
                    answered = True
                stage = "DATA"
                code, message = await replies.next(timeout)
                if not accepted:
                    keep = await replies.finish(0, timeout, data_started=code)
                    return _outcome(rcpts, results)
                if code == 354:
                    replies.write(pipelining.dot_stuff(data))
                    code, message = await replies.next(timeout)
                keep = code != 421
                conn.clean = code == 250
                for i in accepted:
                    results[i] = RcptResult.from_reply(rcpts[i], code, message, remote)
                return _outcome(rcpts, results)
            finally:
                if not replies.restore():
                    keep = False
        stage = "MAIL FROM"
        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except SMTPResponseException as exc:
            if reused and exc.code == 421:
                raise Stale() from None
            counters.reused += unproven
            keep = exc.code != 421
            conn.clean = True  # a refused MAIL FROM opens no transaction
            code, status, text = parse_reply(exc.code, exc.message)
            return Outcome([RcptResult(r, code, status, text, remote) for r in rcpts],
                            next_mx=code // 100 == 4)
        except ValueError as exc:  # unusable sender address (aiosmtplib refuses to send it)
            keep = True
            counters.reused += unproven
            return Failure(553, "5.1.7", f"bad sender address {mail_from!r}: {exc}",
                            remote=remote).outcome(rcpts)
        counters.reused += unproven
        stage = "RCPT TO"
        for i, rcpt in enumerate(rcpts):
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
            except SMTPResponseException as exc:
                if exc.code == 421:  # the server is closing the session
                    if reused and not answered:
                        raise Stale() from None
                    for j in range(len(rcpts)):
                        if j not in results or j in accepted:
                            results[j] = RcptResult.from_reply(rcpts[j], exc.code,
                                                               exc.message, remote)
                    accepted.clear()
                    return _outcome(rcpts, results)
                results[i] = RcptResult.from_reply(rcpt, exc.code, exc.message, remote)
            except ValueError as exc:
                results[i] = RcptResult(rcpt, 553, "5.1.3",
                                        reply_line(f"bad recipient address {rcpt!r}: {exc}"),
                                        None)
                continue
            else:
                accepted.append(i)
            answered = True
        if not accepted:
            keep = True
            return _outcome(rcpts, results)
        stage = "DATA"
        try:
            resp = await _data(smtp, data, timeout)
            code, message = resp.code, resp.message
            keep = conn.clean = True
        except SMTPResponseException as exc:
            code, message = exc.code, exc.message
            keep = exc.code != 421
        for i in accepted:
            results[i] = RcptResult.from_reply(rcpts[i], code, message, remote)
        return _outcome(rcpts, results)
    except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
        keep = False
        if reused and not answered and stage != "DATA":
            raise Stale() from None
        why = "timed out" if isinstance(exc, TimeoutError) else "lost connection"
        failure = Failure(451, "4.4.2", f"{why} with {remote} while sending {stage}"
                           f" ({errno_text(exc)})", remote=remote)
        for i, rcpt in enumerate(rcpts):
            if i not in results or i in accepted:
                results[i] = failure.result(rcpt)
        next_mx = not answered
        return _outcome(rcpts, results, next_mx=next_mx)
    finally:
        conn.keep = keep


async def _data(smtp: SMTP, data: bytes, timeout: float) -> SMTPResponse:
    """DATA, then the message: the reply to it, or SMTPDataError as `SMTP.data()` raises.

    aiosmtplib's `data()` runs two regular expressions over every message (line ends,
    dot-stuffing) that cost more than the rest of the transaction together. A message
    with CRLF line ends only (everything the relay spools) needs neither: it is
    dot-stuffed with one replace() and written as it is. Anything else goes through
    `data()`, which turns bare CR and LF into CRLF."""
    if not compat.can_write_raw(smtp) or has_bare_newline(data):
        return await smtp.data(data, timeout=timeout)
    payload = pipelining.dot_stuff(data)
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise SMTPDataError(start.code, start.message)
    try:
        response = await compat.write_and_read(smtp, payload, timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        smtp.close()
        raise
    if response.code != 250:
        raise SMTPDataError(response.code, response.message)
    return response


def _outcome(rcpts: list[str], results: dict[int, RcptResult], *,
             next_mx: bool = False) -> Outcome:
    return Outcome([results[i] for i in range(len(rcpts))], next_mx=next_mx)


def _mail_options(smtp: SMTP, remote: str, mail_from: str, rcpts: list[str],
                  data: bytes) -> tuple[list[str], str]:
    """MAIL FROM parameters the message needs and the server offers; the address encoding."""
    options: list[str] = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(data)}")
    if not data.isascii() and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    utf8_envelope = not (mail_from.isascii() and all(r.isascii() for r in rcpts))
    if utf8_envelope or not header_block(data).isascii():
        if smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
            return options, "utf-8"
        if utf8_envelope:
            raise Failure(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by "
                          f"host {remote}", remote=remote)
    return options, "ascii"
