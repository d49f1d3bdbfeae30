"""Tracking tokens: HMAC-signed, stateless references to one recipient's copy and one link.

A token is what follows ``/o/`` (open pixel) or ``/c/`` (click) in a tracking URL::

    base64url(payload) "." base64url(HMAC-SHA256(secret, payload)[:16])

    payload = version (1 byte, 1)
              kind    (1 byte: b"o" open, b"c" click, b"h" honeypot click)
              copy    (16 bytes: the ULID of the recipient's copy in the spool, which the
                       store maps to the message and the recipient)
              link    (2 bytes big-endian: the link's number in the message; 0 for opens)
              url     (the rest, UTF-8: the exact URL the author wrote; clicks only)

Binding the copy id (one copy per recipient when tracking is on), the link number and
the URL under one MAC means a token cannot be moved to another recipient, link or
destination: change a byte and verification fails, so the endpoint answers 404 and
records nothing. The endpoint needs no lookup to redirect, so it stays stateless behind
any load balancer. Secrets rotate: the first key signs, every key verifies.

A token has exactly one accepted spelling: canonical unpadded base64url on both sides of
the dot. Base64 has other spellings of the same bytes (``=`` padding, different unused
low bits in the last character, characters outside the alphabet that a lenient decoder
skips); each of them is refused, so one copy's click cannot be recorded twice under two
URLs. The MAC covers the decoded payload, and the text must be what :meth:`make` writes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.ids import queue_id_text, queue_id_value

VERSION = 1
MAC_LEN = 16
KINDS: dict[bytes, Literal["open", "click", "honeypot"]] = {
    b"o": "open", b"c": "click", b"h": "honeypot"}
_KIND_BYTES = {v: k for k, v in KINDS.items()}
#: Tokens longer than this are refused before any work (a URL is at most a few KB).
MAX_TOKEN_LEN = 8192


@dataclass(frozen=True)
class TokenData:
    """What a verified token says."""

    kind: Literal["open", "click", "honeypot"]
    copy_id: str            # the spool queue id of the recipient's copy (26-char ULID)
    link: int               # link number in the message, 0 for an open
    url: str | None         # the original URL for clicks, None for opens


def _ulid_to_bytes(qid: str) -> bytes:
    return queue_id_value(qid).to_bytes(16, "big")


def _bytes_to_ulid(raw: bytes) -> str:
    return queue_id_text(int.from_bytes(raw, "big"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _unb64(text: str) -> bytes:
    """The bytes of canonical unpadded base64url `text`; ValueError for any other spelling."""
    if not text or not _B64URL.issuperset(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # unused low bits of the last character set: another spelling
        raise ValueError("not the canonical spelling")
    return data


class TokenSigner:
    """Makes and verifies tokens with one signing key and any number of older keys."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) < 16 for k in keys):
            raise ValueError("tracking needs at least one secret key of 16 bytes or more")
        self._keys = list(keys)

    @classmethod
    def from_text(cls, text: str) -> TokenSigner:
        """Keys from a secret file: one per line (first signs), used as UTF-8 bytes."""
        keys = [line.strip().encode() for line in text.splitlines() if line.strip()]
        return cls(keys)

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_LEN]

    def make(self, kind: Literal["open", "click", "honeypot"], copy_id: str, link: int = 0,
             url: str | None = None) -> str:
        if not 0 <= link < 65536:
            raise ValueError("link number out of range")
        payload = (bytes([VERSION]) + _KIND_BYTES[kind] + _ulid_to_bytes(copy_id)
                   + link.to_bytes(2, "big") + (url or "").encode("utf-8"))
        return f"{_b64(payload)}.{_b64(self._mac(self._keys[0], payload))}"

    def open_token(self, copy_id: str) -> str:
        return self.make("open", copy_id)

    def click_token(self, copy_id: str, link: int, url: str) -> str:
        return self.make("click", copy_id, link, url)

    def verify(self, token: str) -> TokenData | None:
        """The token's content if its MAC verifies under any key (constant-time), else None."""
        if len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
            return None
        body, mac_text = token.split(".")
        try:
            payload = _unb64(body)
            mac = _unb64(mac_text)
        except (binascii.Error, ValueError):
            return None
        if len(mac) != MAC_LEN or len(payload) < 20:
            return None
        ok = False
        for key in self._keys:  # every key is tried: timing does not tell which matched
            ok |= hmac.compare_digest(self._mac(key, payload), mac)
        if not ok or payload[0] != VERSION or payload[1:2] not in KINDS:
            return None
        kind = KINDS[payload[1:2]]
        try:
            url = payload[20:].decode("utf-8") if kind != "open" else None
        except UnicodeDecodeError:
            return None
        if kind == "open" and len(payload) != 20:
            return None
        return TokenData(kind=kind, copy_id=_bytes_to_ulid(payload[2:18]),
                         link=int.from_bytes(payload[18:20], "big"), url=url)


def load_or_create_secret(path: Path) -> str:
    """The tracking secret file's text; a new random key (0600) when the file does not exist."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        key = secrets.token_urlsafe(32) + "\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return path.read_text(encoding="utf-8")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        return key
