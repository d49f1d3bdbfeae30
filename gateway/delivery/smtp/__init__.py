"""The aiosmtplib implementation of `gateway.delivery.transport.Transport`.

Modules by concern: `transport` (`SMTPTransport`: send, send_mx, the pool put
together), `connect` (connect, EHLO, STARTTLS, AUTH), `transaction` (MAIL, RCPT,
DATA), `pipelining` (RFC 2920 batches and their reply reader), `pool` (per-destination
connection pools), `tls` (client contexts), `failures` (how a step ends when it is not
a reply per recipient). aiosmtplib's internals are reached only through
`gateway.delivery.aiosmtplib_compat`.

How failures are labelled::

    connect refused / reset / unreachable ......... 451 4.4.1  every recipient
    connect or greeting timed out ................. 451 4.4.1  every recipient
    connection lost or timed out mid-session ...... 451 4.4.2  recipients without an answer
    greeting 4xx/5xx ("refused to talk to me") .... 4xx        every recipient (5xx softened,
                                                               like Postfix smtp_skip_5xx_greeting)
    STARTTLS required but not offered ............. 451 4.7.4  every recipient
    TLS handshake or certificate failure .......... 451 4.7.5  every recipient
    AUTH rejected (535) or not offered ............ 454 4.7.8 / 4.7.0  (an admin fixes the
                                                               credentials; nothing bounces;
                                                               the upstream's reply, e.g.
                                                               "535 5.7.8 ...", in the text)
    OAuth token refused twice (535), grant refused  454 4.7.8  "<account> needs reconnecting"
                                                               (one fresh token in between;
                                                               see `connect`)
    token endpoint unreachable .................... 451 4.7.0  every recipient
    EHLO/HELO 5xx, MAIL FROM 5xx .................. the reply, every recipient
    RCPT reply .................................... the reply, that recipient
    DATA reply .................................... the reply, every accepted recipient
    UTF-8 envelope, server without SMTPUTF8 ....... 550 5.6.7  every recipient (RFC 6531)

Connections are pooled per destination: after a transaction the connection goes
idle; the next message to the same destination (every `Destination` field equal
but `address` and `token`: host, port, TLS settings, credentials) reuses it, and an idle
connection is closed (QUIT) after `idle_timeout`. A connection is not reused once it
is `reuse_time` seconds old or has carried `reuse_count` messages (Postfix's
smtp_connection_reuse_time_limit / _count_limit). At most `per_destination`
connections to one destination are open at any time; further senders wait. A
reused connection that turns out dead before any recipient was answered is replaced
once by a fresh one; a connection lost during or after DATA is never retried here:
the server may have taken the message, and the scheduler's next attempt is the
retry (4.4.2).

8-bit data: BODY=8BITMIME is requested when the message has 8-bit bytes and the
server offers it. When the server does not offer it the message is still sent as
it is, unconverted: nearly every server copes, and converting to quoted-printable
(what RFC 6152 would ask) would change signed bytes and break DKIM. SMTPUTF8 is requested
when the envelope or the header block is non-ASCII and the server offers it; a
non-ASCII envelope to a server without SMTPUTF8 bounces with 5.6.7, a non-ASCII
header block alone is sent anyway.

`send_mx()` adds MX routing: resolve, then try each exchanger's addresses in
preference order, moving on after connection-level failures and 4xx replies to
the greeting, EHLO or MAIL FROM (like Postfix), and stopping at the first host
that gave an answer about the recipients.
"""

from gateway.delivery.smtp.pipelining import dot_stuff
from gateway.delivery.smtp.transport import SMTPTransport

__all__ = ["SMTPTransport", "dot_stuff"]
