"""Independent checks on a transformed message: it parses, every part decodes, tokens verify."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage

from gateway.tracking.tokens import TokenData, TokenSigner

MAX_LINE = 998


def long_lines(data: bytes) -> list[int]:
    """Numbers (1-based) of the lines longer than 998 octets without their CRLF."""
    return [i + 1 for i, line in enumerate(data.split(b"\r\n")) if len(line) > MAX_LINE]


def parsed(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def decoded_texts(data: bytes) -> list[tuple[str, str]]:
    """(content type, text) of every text/* part outside attached messages, decoded with the
    stdlib in the part's declared charset; fails when a part does not decode."""
    out: list[tuple[str, str]] = []

    def walk(part: EmailMessage) -> None:
        assert not part.defects, part.defects
        if part.is_multipart():
            for sub in part.iter_parts():
                assert isinstance(sub, EmailMessage)
                walk(sub)
            return
        if part.get_content_maintype() != "text":
            return
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        charset = part.get_content_charset() or "us-ascii"
        out.append((part.get_content_type(), payload.decode(charset)))   # strict: must decode

    walk(parsed(data))
    return out


def tokens_in(text: str, base_url: str, kind: str) -> list[str]:
    return re.findall(re.escape(base_url) + "/" + kind + r"/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)", text)


def verified(signer: TokenSigner, token: str) -> TokenData:
    data = signer.verify(token)
    assert data is not None, f"token does not verify: {token}"
    return data
