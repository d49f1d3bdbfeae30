"""What the scheduler asks of an SMTP client: the `Transport` protocol and its values.

A transport hands one message to one destination (`send`) or to the mail exchangers
of one domain (`send_mx`) and says, per recipient, what became of it. It never
raises for SMTP, DNS or network trouble: every failure comes back as a `RcptResult`
labelled temporary (4xx, retry later) or permanent (5xx, bounce) by the transport,
where the reason is known, so nothing downstream guesses.

A `Destination` may log in with a password (`username`, `password`) or, for a
connected account whose tokens come from OAuth 2.0, with XOAUTH2 or OAUTHBEARER
(`username`, `mechanism`, and `token`, the `TokenGetter` that yields the bearer
token). The token never lives in the `Destination` itself, which keys the connection
pool: the transport asks `token()` when it logs in, and `token(rejected=t)` once more
when the server refused `t`. Results caused by an account's credentials carry
`RcptResult.credentials` ("refused": the account needs reconnecting; "missing": the
upstream demands AUTH and the account has none), for the scheduler to act on.

`gateway.delivery.smtp.SMTPTransport` is the implementation (aiosmtplib, pooled
connections); `tests.support.transport.MemoryTransport` answers from a script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.delivery.mx import MXResolver
from gateway.errors import AccountAuthError, AccountError
from gateway.oauth.sasl import MECHANISMS

__all__ = ["CredentialTrouble", "Destination", "RcptResult", "TLSMode", "TokenGetter",
           "Transport", "parse_reply", "reply_line", "token_error_reply"]

TLSMode = Literal["none", "starttls", "implicit", "opportunistic"]
_TLS_MODES = ("none", "starttls", "implicit", "opportunistic")

#: Why an account's credentials did not get a message through: "refused" (the upstream or
#: the token endpoint refused them: the account needs reconnecting) or "missing" (the
#: upstream demands AUTH and the account has no SMTP credentials).
CredentialTrouble = Literal["refused", "missing"]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_TEXT = 900  # keeps "<code> <status> <text>" well under 998 octets (DSN lines, logs)


class Transport(Protocol):
    """The scheduler's SMTP client: one message per call, one result per recipient."""

    async def send(self, dest: Destination, mail_from: str, rcpts: list[str],
                   data: bytes) -> list[RcptResult]:
        """Deliver `data` to `rcpts` at `dest`; one result per recipient, in order."""
        ...

    async def send_mx(self, resolver: MXResolver, domain: str, mail_from: str,
                      rcpts: list[str], data: bytes, *, port: int, tls: TLSMode,
                      ca_file: str | None) -> list[RcptResult]:
        """Deliver to the mail exchangers of `domain` (all `rcpts` must be in it); DNS
        failures come back as results too."""
        ...

    async def close(self) -> None:
        """Let every connection go; called once when the scheduler stops."""
        ...


class TokenGetter(Protocol):
    """The OAuth 2.0 access token for a `Destination` that logs in with `mechanism`.

    `rejected`: the token the server just refused (forces a fresh one). Raises
    `AccountAuthError` when the grant is refused (the account needs reconnecting) and
    `AccountUnavailable` when no token can be had for now."""

    async def __call__(self, *, rejected: str | None = None) -> str: ...


@dataclass(frozen=True)
class Destination:
    """Where to deliver: one SMTP server and how to talk to it.

    `tls`: 'none' (plaintext), 'starttls' (upgrade, certificate verified against
    `ca_file` or the system store; with `tls_required` a server without STARTTLS is
    a temporary failure, without it the session stays plaintext), 'implicit' (TLS
    from the first byte, verified), 'opportunistic' (STARTTLS when offered, no
    verification, plaintext when not offered or when the handshake fails; Postfix
    `may`). `verify=False` turns verification off for 'starttls'/'implicit'.

    `address`, when set, is the IP address to connect to; `host` then only names the
    server (TLS SNI and certificate name, logs, `RcptResult.remote`). `send_mx` uses
    it to connect to the addresses it resolved through its own DNS resolver.

    `mechanism` ("xoauth2" or "oauthbearer") logs in as `username` with a bearer token
    from `token` instead of a password. `account` names the connected account the
    credentials belong to (replies name it). `token` takes no part in equality: two
    destinations that differ only by it share their pooled connections.
    """

    host: str
    port: int
    tls: TLSMode = "none"
    tls_required: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    verify: bool = True
    address: str | None = None
    mechanism: str | None = None
    account: str | None = None
    token: TokenGetter | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(_TLS_MODES)}, not {self.tls!r}")
        if self.mechanism is not None:
            if self.mechanism not in MECHANISMS:
                raise ValueError(f"mechanism must be one of {', '.join(MECHANISMS)}, "
                                 f"not {self.mechanism!r}")
            if self.username is None or self.token is None:
                raise ValueError(f"mechanism {self.mechanism} needs username and token")
            if self.password is not None:
                raise ValueError(f"mechanism {self.mechanism} takes no password")
        elif self.token is not None:
            raise ValueError("token is only used with mechanism (xoauth2, oauthbearer)")

    @property
    def who(self) -> str:
        """Whose credentials these are, for replies: `account ID` or the login name."""
        return f"account {self.account}" if self.account else (self.username or "nobody")

    @property
    def where(self) -> str:
        """`host[address]:port` or `host:port` (for messages before a connection exists)."""
        if self.address and self.address != self.host:
            return f"{self.host}[{self.address}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RcptResult:
    """What one delivery attempt did for one recipient.

    `code` is always 2xx, 4xx or 5xx; `status` the RFC 3463 enhanced code (from the
    server's reply when it gave one of the same class, else `<class>.0.0`); `text`
    the reply text on one line; `remote` "host[ip]:port" of the server that answered,
    None when no server answered (connection failed, DNS); `credentials` is set when the
    account's credentials are why the message did not go (see `CredentialTrouble`).
    """

    rcpt: str
    code: int
    status: str
    text: str
    remote: str | None = None
    credentials: CredentialTrouble | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def reply(self) -> str:
        """The reply as one line, e.g. `550 5.1.1 no such user`."""
        return f"{self.code} {self.status} {self.text}".rstrip()

    @classmethod
    def from_reply(cls, rcpt: str, code: int, message: str, remote: str | None) -> RcptResult:
        """Build from a raw server reply (code and possibly multi-line text)."""
        code, status, text = parse_reply(code, message)
        return cls(rcpt=rcpt, code=code, status=status, text=text, remote=remote)


def parse_reply(code: int, message: str) -> tuple[int, str, str]:
    """(code, multi-line text) -> (code, enhanced status, one-line text).

    A code outside 2xx/4xx/5xx (a 3xx where none belongs, garbage) becomes a
    temporary 451 4.5.0 so that it can never count as delivered or bounce a message.
    """
    if not (200 <= code < 300 or 400 <= code < 600):
        return 451, "4.5.0", reply_line(f"unexpected reply {code} {message}")
    klass = str(code)[0]
    status: str | None = None
    parts: list[str] = []
    for line in message.splitlines():
        line = line.strip()
        m = _ENHANCED.match(line)
        if m and m.group(1) == klass:
            status = status or ".".join(m.groups())
            line = line[m.end():].strip()
        if line:
            parts.append(line)
    return code, status or f"{klass}.0.0", reply_line(" ".join(parts))


def reply_line(text: str) -> str:
    """Reply text fit for one line of a DSN or a log: control characters collapsed to a
    space, at most 900 characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."


def token_error_reply(dest: Destination, exc: AccountError) -> tuple[
        int, str, str, CredentialTrouble | None]:
    """(code, status, text, credentials) for every recipient when `dest.token` raised.

    A refused grant is 454 4.7.8 "needs reconnecting" (credentials "refused"); anything
    else (token endpoint down or slow) is 451 4.7.0, retried later. Never 5xx: an admin
    or the account's owner fixes this, and nothing bounces meanwhile."""
    if isinstance(exc, AccountAuthError):
        return (454, "4.7.8", reply_line(f"{dest.who} needs reconnecting: its OAuth grant "
                                         f"was refused ({exc.text})"), "refused")
    return (451, "4.7.0", reply_line(f"no access token for {dest.who} for now, will retry: "
                                     f"{exc.text}"), None)
