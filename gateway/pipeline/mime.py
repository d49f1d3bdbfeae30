"""A byte-preserving MIME tree: parse a message into raw byte ranges, edit a few text parts, re-emit.

Every entity (the message or a body part) is kept as its header block, the blank line
and its body, all as the original bytes. A multipart body is a list of segments —
the raw bytes between parts (preamble, delimiter lines with their CRLFs, transport
padding, epilogue) and the child entities — so `serialize()` gives back the input
byte for byte until a leaf's text is replaced, and then only that leaf changes.

A leaf's text is decoded with the stdlib (base64, quoted-printable, then its
charset); `replace_text()` re-encodes it with the *same* charset and the same
Content-Transfer-Encoding, with these exceptions, each recorded in `notes`:

- a ``7bit`` (or unlabelled) part whose new text has non-ASCII bytes, and a ``7bit``,
  ``8bit`` or ``binary`` part with a line over 998 octets, is re-encoded as
  ``quoted-printable`` and its ``Content-Transfer-Encoding`` field is replaced (or
  added at the end of the part's header);
- text a text/html part's charset cannot represent becomes numeric character
  references (``&#8364;``); text a text/plain part's charset cannot represent makes
  the part UTF-8 (its ``charset`` parameter is set to ``utf-8``: for ``us-ascii``
  the existing bytes are unchanged).

Which leaves are the message's *body* (`MimeTree.body_parts`): a non-multipart
message's own text/plain or text/html; in ``multipart/alternative`` every
alternative; in ``multipart/related`` the root (the ``start`` part, else the first);
in ``multipart/mixed`` (and unknown multiparts) the first part and then the inline
text parts that follow it up to the first part that is not. A part with a
``Content-Disposition: attachment`` or a filename is never body, nothing inside
``message/*`` is ever looked into, and ``multipart/signed`` / ``multipart/encrypted``
are left whole (changing them would break the signature).

Line endings: SMTP gives CRLF; a message whose first line ends in a bare LF is
handled with LF, and new text uses the message's line ending. Where an entity's header
block ends and where a multipart body's parts start and stop is decided by
`gateway.mail.headers.split_entity` and `gateway.mail.mime.cut_multipart`, the same cuts
the parser makes (their CR/LF rules are written there); header fields are found and
edited with `gateway.mail.headers`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from gateway.mail.headers import field_span, set_field, split_entity
from gateway.mail.mime import boundary_bytes, cut_multipart

MAX_LINE = 998          # octets, without the line ending (RFC 5322 §2.1.1)
MAX_DEPTH = 32          # nesting deeper than this is left whole
_B64_LINE = 76
_ASCII_PROBE = "<a href=\"x\">\r\n+-&=;:/?#%'~\\"
_CHARSET_PARAM_RE = re.compile(rb"""(;[ \t\r\n]*charset[ \t]*=[ \t]*)("[^"]*"|[^;\s"]+)""", re.I)
_OPAQUE = frozenset({"multipart/signed", "multipart/encrypted"})
_ENCODED = frozenset({"base64", "quoted-printable"})
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


class MimeError(ValueError):
    """A part's content cannot be decoded (unknown transfer encoding or charset, invalid bytes)."""


def _codec(charset: str) -> str:
    """The Python codec for a MIME charset that keeps ASCII as ASCII, else MimeError."""
    try:
        info = codecs.lookup(charset)
    except LookupError as exc:
        raise MimeError(f"unknown charset {charset!r}") from exc
    try:
        ok = (_ASCII_PROBE.encode(info.name) == _ASCII_PROBE.encode("ascii")
              and _ASCII_PROBE.encode("ascii").decode(info.name) == _ASCII_PROBE)
    except (UnicodeError, LookupError):
        ok = False
    if not ok:
        raise MimeError(f"charset {charset!r} is not ASCII-compatible")
    return info.name


def _qp_encode(data: bytes, nl: bytes) -> bytes:
    """Quoted-printable with `nl` as hard and soft line ending; other CR/LF bytes are escaped."""
    out = []
    for line in data.split(nl):
        enc = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        out.append(enc.replace(b"=\n", b"=" + nl) if nl != b"\n" else enc)
    return nl.join(out)


def _b64_encode(data: bytes, nl: bytes) -> bytes:
    enc = base64.b64encode(data)
    return nl.join(enc[i:i + _B64_LINE] for i in range(0, len(enc), _B64_LINE))


def _long_line(data: bytes) -> bool:
    if len(data) <= MAX_LINE:
        return False
    # bytes.splitlines breaks at CRLF, LF and CR only: the line ends of RFC 5322 and bare ones
    return max(map(len, data.splitlines())) > MAX_LINE


def _bare_line_break(data: bytes, nl: bytes) -> bool:
    """Whether `data` has a CR or LF that is not part of a line ending `nl`."""
    if nl == b"\r\n":
        rest = data.replace(b"\r\n", b"")
        return b"\r" in rest or b"\n" in rest
    return b"\r" in data


_NO_FIELD = object()


class _Header(Message):
    """A parsed header block whose parameter lists are parsed once per field.

    `Message` parses a field's parameters again for every ``get_param`` (an entity asks
    for charset, boundary, name and filename, some twice); an entity's header block
    never changes once parsed, so the parse is kept. Each call gets its own list."""

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        cache: dict[str, Any] = self.__dict__.setdefault("_mailgw_params", {})
        key = header.lower()
        params = cache.get(key)
        if params is None:
            params = cache[key] = super()._get_params_preserve(_NO_FIELD, header)  # type: ignore[misc]
        return failobj if params is _NO_FIELD else list(params)


class Entity:
    """One MIME entity: the message itself, a body part, or a part of a part."""

    def __init__(self, raw: bytes, nl: bytes, path: str, depth: int,
                 default_type: str = "text/plain") -> None:
        self.raw = raw
        self.nl = nl
        self.path = path                       # "" for the message, "1", "1.2", ... for parts
        self.header, self.sep, self.body = split_entity(raw)
        self._msg: Message = BytesHeaderParser(_Header, policy=compat32).parsebytes(self.header)
        if default_type != "text/plain":
            self._msg.set_default_type(default_type)
        self.content_type: str = self._msg.get_content_type()
        raw_ct = self._msg.get("content-type")
        # an unparsable Content-Type reads as text/plain in `email`; here it is left alone
        self.malformed = raw_ct is not None and (
            str(raw_ct).split(";", 1)[0].strip().lower() != self.content_type)
        charset = self._msg.get_param("charset")
        self.charset: str | None = (
            self._msg.get_content_charset() if isinstance(charset, (str, tuple)) else None)
        cte = self._msg.get("content-transfer-encoding")
        self.cte: str = str(cte).strip().lower() if cte is not None else "7bit"
        self.cte_declared = cte is not None
        disposition = self._msg.get_content_disposition()
        self.disposition: str | None = disposition
        try:
            self.filename: str | None = self._msg.get_filename()
        except (ValueError, LookupError, TypeError):
            self.filename = "?"
        if self.filename is None:
            name = self._msg.get_param("name")
            self.filename = name if isinstance(name, str) else ("?" if name else None)
        self.children: list[Entity] = []
        self._segments: list[bytes | Entity] = []
        self._text: str | None = None          # replaced text, encoded on serialize()
        #: (text, offset): where the open pixel goes in `text`, known by the links stage from
        #: its own tokenizing; the pixel stage uses it while the part's text is that text
        self.pixel_at: tuple[str, int] | None = None
        self._decoded: str | None = None
        self._implicit_utf8 = False             # unlabelled 8-bit text that is valid UTF-8
        self.notes: list[str] = []
        if self.is_multipart and not self.malformed and self.content_type not in _OPAQUE \
                and depth < MAX_DEPTH:
            self._parse_multipart(depth)

    # -- structure -------------------------------------------------------------------

    @property
    def where(self) -> str:
        """How notes and errors name this entity."""
        return f"part {self.path}" if self.path else "message body"

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment" or self.filename is not None

    @property
    def is_text_body_type(self) -> bool:
        return self.content_type in ("text/plain", "text/html")

    def param(self, name: str) -> str | None:
        value = self._msg.get_param(name)
        return value if isinstance(value, str) else None

    def _parse_multipart(self, depth: int) -> None:
        boundary = self._msg.get_boundary()
        if not boundary:
            return
        parts, gaps = cut_multipart(self.body, boundary_bytes(boundary))
        if not parts:
            return
        child_default = "message/rfc822" if self.content_type == "multipart/digest" else "text/plain"
        segments: list[bytes | Entity] = []
        for gap, part in zip(gaps, parts, strict=False):
            child = Entity(part, self.nl, f"{self.path}.{len(self.children) + 1}".lstrip("."),
                           depth + 1, child_default)
            self.children.append(child)
            segments += [gap, child]
        segments.append(gaps[-1])
        self._segments = segments

    def walk(self) -> Iterator[Entity]:
        yield self
        for child in self.children:
            yield from child.walk()

    # -- text ------------------------------------------------------------------------

    def _payload(self) -> bytes:
        if self.cte == "base64":
            try:
                return binascii.a2b_base64(self.body)
            except binascii.Error as exc:
                raise MimeError(f"{self.where}: bad base64") from exc
        if self.cte == "quoted-printable":
            return binascii.a2b_qp(self.body)
        if self.cte in _IDENTITY:
            return self.body
        raise MimeError(f"{self.where}: unknown transfer encoding {self.cte!r}")

    def decoded(self) -> str:
        """The part's current text (its replacement if `replace_text` was called)."""
        if self._text is not None:
            return self._text
        if self._decoded is None:
            if self.is_multipart:
                raise MimeError("a multipart has no text of its own")
            payload = self._payload()
            try:
                codec = _codec(self.charset or "us-ascii")
            except MimeError as exc:
                raise MimeError(f"{self.where}: {exc}") from exc
            try:
                self._decoded = payload.decode(codec)
            except UnicodeDecodeError as exc:
                if self.charset is not None:
                    raise MimeError(f"{self.where}: not valid {self.charset}") from exc
                try:        # unlabelled 8-bit text: UTF-8 re-encodes to the same bytes
                    self._decoded = payload.decode("utf-8")
                    self._implicit_utf8 = True
                except UnicodeDecodeError:
                    raise MimeError(f"{self.where}: 8-bit text without a charset") from exc
        return self._decoded

    def replace_text(self, text: str) -> None:
        """Set new text; it is encoded (same charset and transfer encoding) by `serialize`."""
        self.decoded()              # the part must be decodable in the first place
        self._text = text

    @property
    def changed(self) -> bool:
        return self._text is not None or any(c.changed for c in self.children)

    def _encode_text(self, text: str) -> tuple[bytes, bytes]:
        """(new header, new body) for replaced text; sets `notes` afresh."""
        self.notes = []
        header = self.header
        if header and not header.endswith(b"\n"):     # a header block cut off without its line end
            header += self.nl
        charset = self.charset or ("utf-8" if self._implicit_utf8 else "us-ascii")
        codec = _codec(charset)
        try:
            payload = text.encode(codec)
        except UnicodeEncodeError:
            if self.content_type == "text/html":
                payload = text.encode(codec, errors="xmlcharrefreplace")
                self.notes.append(f"{self.where}: characters outside {charset} "
                                  "written as character references")
            else:
                payload = text.encode("utf-8")
                header = self._with_charset(header, "utf-8")
                self.notes.append(f"{self.where}: charset {charset} -> utf-8 "
                                  "(new text not representable)")
        cte = self.cte
        if cte in _IDENTITY or not self.cte_declared:
            long_line = _long_line(payload)
            gains_8bit = cte == "7bit" and not payload.isascii()
            bare = _bare_line_break(payload, self.nl)
            if long_line or gains_8bit or bare:
                why = ("line over 998 octets" if long_line else "non-ASCII text in a 7bit part"
                       if gains_8bit else "bare CR or LF in the text")
                self.notes.append(f"{self.where}: re-encoded as quoted-printable ({why})")
                header = set_field(header, b"Content-Transfer-Encoding", b"quoted-printable", self.nl)
                cte = "quoted-printable"
        if cte == "base64":
            tail = self.body[len(self.body.rstrip(b"\r\n")):]
            return header, _b64_encode(payload, self.nl) + tail
        if cte == "quoted-printable":
            return header, _qp_encode(payload, self.nl)
        return header, payload

    def _with_charset(self, header: bytes, charset: str) -> bytes:
        span = field_span(header, b"Content-Type")
        if span is None:
            return set_field(header, b"Content-Type",
                              f"{self.content_type}; charset={charset}".encode(), self.nl)
        field = header[span[0]:span[1]]
        new, n = _CHARSET_PARAM_RE.subn(lambda m: m.group(1) + charset.encode(), field, count=1)
        if n == 0:
            stripped = field.rstrip(b"\r\n")
            new = stripped + b"; charset=" + charset.encode() + field[len(stripped):]
        return header[:span[0]] + new + header[span[1]:]

    # -- output ----------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The entity's bytes: the original ones unless something inside changed."""
        if not self.changed:
            return self.raw
        if self._text is not None:
            header, body = self._encode_text(self._text)
            sep = self.sep or self.nl
            return header + sep + body
        return self.header + self.sep + b"".join(
            s if isinstance(s, bytes) else s.serialize() for s in self._segments)


class MimeTree:
    """A parsed message; `serialize()` returns the very input object when nothing changed."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        first = raw.find(b"\n")
        self.nl = b"\n" if first >= 0 and (first == 0 or raw[first - 1:first] != b"\r") else b"\r\n"
        self.root = Entity(raw, self.nl, "", 0)

    @property
    def changed(self) -> bool:
        return self.root.changed

    def serialize(self) -> bytes:
        if not self.root.changed:
            return self.raw
        return self.root.serialize()

    @property
    def notes(self) -> list[str]:
        return [n for e in self.root.walk() for n in e.notes]

    def walk(self) -> Iterator[Entity]:
        return self.root.walk()

    def body_parts(self) -> list[Entity]:
        """The text/plain and text/html leaves that are the message's body, in order."""
        out: list[Entity] = []
        _collect_body(self.root, out)
        return out

    def header_values(self, name: str) -> list[str]:
        return [str(v) for v in self.root._msg.get_all(name, [])]


def _collect_body(e: Entity, out: list[Entity]) -> None:
    if e.malformed or e.is_attachment:
        return
    if not e.is_multipart:
        if e.is_text_body_type:
            out.append(e)
        return
    if not e.children:          # opaque (signed/encrypted), too deep or without parts
        return
    sub = e.content_type.split("/", 1)[1]
    if sub == "alternative":
        for c in e.children:
            _collect_body(c, out)
    elif sub == "related":
        start = e.param("start")
        root = e.children[0]
        if start:
            for c in e.children:
                cid = c._msg.get("content-id")
                if cid is not None and str(cid).strip() == start.strip():
                    root = c
                    break
        _collect_body(root, out)
    elif sub in ("digest", "report"):
        if sub == "report":     # only the human-readable first part of a DSN/MDN
            _collect_body(e.children[0], out)
    else:
        _collect_body(e.children[0], out)
        for c in e.children[1:]:
            if c.is_multipart or c.malformed or c.is_attachment or not c.is_text_body_type:
                break
            if c.disposition not in (None, "inline"):
                break
            out.append(c)
