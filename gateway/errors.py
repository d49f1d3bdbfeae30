"""The exception tree of mailgw, labelled temporary or permanent where a failure happens.

::

    GatewayError                      base of everything mailgw raises on purpose
    ├── ConfigError                   invalid configuration; carries every Problem (file, line, key)
    ├── UsageError                    bad command-line usage (exit code 2)
    ├── MailError                     a failure about one message, with an SMTP reply
    │   ├── TemporaryFailure          4xx: try again later (spool full, upstream 451, network)
    │   │   └── SpoolError            the spool could not take or update a message
    │   └── PermanentFailure          5xx: will never work (upstream 550, policy, syntax)
    ├── StoreError                    the CRM store failed (temporary by nature)
    ├── NotFound                      a queue id, message or account that does not exist
    └── AccountError                  a connected mailbox (IMAP server, OAuth2 token endpoint) failed
        ├── AccountAuthError          credentials refused (IMAP NO to LOGIN/AUTHENTICATE, OAuth2
        │                             invalid_grant): the account needs_reconnect; `server_text`
        │                             holds the server's words; never retried on its own
        ├── AccountUnavailable        network, TLS, BYE, garbage, token endpoint 5xx: reconnect
        │   │                         later with capped exponential backoff
        │   └── AccountTimeout        a wait (connect, command, IDLE liveness) ran out
        ├── IMAPCommandError          the server answered NO/BAD to one command (no such mailbox,
        │                             APPEND refused); the connection is still usable
        └── FolderError               a configured folder cannot be synced: missing, or special-use
                                      Junk/Drafts/Trash/All/Flagged that is never synced

Whoever raises a MailError decides whether it is temporary or permanent and which
reply code and enhanced status it carries; nothing downstream guesses. The same holds for
AccountError: `temporary` says whether reconnecting later can help.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base class of every error mailgw raises deliberately."""


@dataclass(frozen=True)
class Problem:
    """One configuration problem, located in a file by line and key path."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigError(GatewayError):
    """The configuration (or a file it names) is invalid; `problems` lists every issue."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(GatewayError):
    """Bad command-line usage."""


class MailError(GatewayError):
    """A failure concerning one message, carrying the SMTP reply to give for it."""

    code: int = 451
    status: str = "4.3.0"

    def __init__(self, text: str, *, code: int | None = None, status: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def smtp_reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class TemporaryFailure(MailError):
    """A 4xx failure: the same thing may work later."""

    code = 451
    status = "4.3.0"


class SpoolError(TemporaryFailure):
    """The spool could not store or update a message (disk full, unwritable)."""


class PermanentFailure(MailError):
    """A 5xx failure: retrying will not help."""

    code = 554
    status = "5.0.0"


class StoreError(GatewayError):
    """The CRM store could not be reached or refused a write."""


class NotFound(GatewayError):
    """The named queue id, message or account does not exist."""


class Conflict(GatewayError):
    """The change contradicts what is there (an id already taken, an account declared in
    gateway.yaml changed through the API); the API answers 409."""


class AccountError(GatewayError):
    """A connected mailbox failed; `server_text` carries the server's own words, if any."""

    temporary: bool = False

    def __init__(self, text: str, *, server_text: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.server_text = server_text


class AccountAuthError(AccountError):
    """The server or token endpoint refused the credentials: the account needs reconnecting."""


class AccountUnavailable(AccountError):
    """Network, TLS, protocol or server trouble: the same thing may work after a reconnect."""

    temporary = True


class AccountTimeout(AccountUnavailable):
    """A wait (connect, greeting, command, IDLE liveness) exceeded its timeout."""


class IMAPCommandError(AccountError):
    """The server answered NO or BAD to one command; the connection remains usable."""

    def __init__(self, text: str, *, server_text: str = "", command: str = "") -> None:
        super().__init__(text, server_text=server_text)
        self.command = command


class FolderError(AccountError):
    """Configured folders that cannot be synced; `problems` maps each to the reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name!r}: {why}" for name, why in problems.items()))
