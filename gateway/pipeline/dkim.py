"""DKIM signing, the last pipeline stage: prepend rsa-sha256 and/or ed25519-sha256 signatures.

How a signature is made (RFC 6376 §3.7, RFC 8463 §3):

1. dkimpy parses the header block (``dkim.rfc822_parse``) and canonicalises the header
   fields with its relaxed policy (``dkim.canonicalization``). The body is canonicalised
   by :func:`relaxed_body`, dkimpy's algorithm minus its needless full-body regex passes
   (a property test checks it equals dkimpy's on arbitrary bodies); the body hash
   ``bh=`` is computed once per message and shared by every signature (both algorithms
   hash with SHA-256).
2. We write the ``DKIM-Signature`` tag list ourselves (``v a c d s t [x] h bh b``, no
   ``l=``, folded at tag boundaries) with an empty ``b=``.
3. dkimpy's ``hash_headers`` feeds the selected, canonicalised header fields and the
   signature header itself (``b=`` emptied) into SHA-256, exactly as its verifier does.
4. The digest is signed by ``cryptography``: RSASSA-PKCS1-v1_5 with a prehashed SHA-256
   digest for ``rsa-sha256``; for ``ed25519-sha256`` PureEd25519 over the 32-byte digest,
   as RFC 8463 §3 prescribes. dkimpy would do RSA in pure Python (``dkim.crypto``,
   about 11 ms per 2048-bit signature here against about 0.5 ms, see ``bench/dkim.py``)
   and needs PyNaCl for ed25519. Nothing in dkimpy is patched: we only call its parser,
   canonicaliser and header hasher.

Which header fields are signed (``h=``): every instance present of From, Sender, To, Cc,
Subject, Date, Message-ID, Reply-To, In-Reply-To, References, MIME-Version, Content-Type,
Content-Transfer-Encoding, List-Unsubscribe, List-Unsubscribe-Post. The fields a reader
sees or a mailbox provider acts on — From, To, Cc, Subject, Date, Message-ID, Reply-To,
List-Unsubscribe and List-Unsubscribe-Post — are "over-signed" (RFC 6376 §8.15): listed
once more than they occur, also when absent, so that nobody on the way can add another
(or a first) instance without breaking the signature. That matters most for From (a
second From shown by the reader's client) and for the RFC 8058 one-click unsubscribe
fields. The cost: a mailing list that adds ``List-Unsubscribe`` breaks our signature,
which it does anyway when it touches the subject or body.

The signing domain ``d=`` is the configured domain equal to the From address's domain
or the nearest parent of it (``sales.example.com`` mail is signed by ``example.com``'s
key: relaxed DMARC alignment). The message itself is not changed: the new header fields
are prepended, so earlier DKIM signatures keep verifying. Keys are parsed once, when the
:class:`Signer` is made; signing is thread-safe and can run in an executor.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, correct_empty_body, strip_trailing_lines

from gateway.config import Config, read_secret_bytes
from gateway.errors import ConfigError, PermanentFailure, Problem
from gateway.keys.dkim import Algorithm, KeyFileError, PrivateKey, algorithm_for, load_private_key
from gateway.mail.addresses import domain_of
from gateway.mail.headers import split_entity
from gateway.policy.rules import nearest_domain

#: Signed when present, every instance (RFC 6376 §5.4.1 recommendations, plus RFC 8058).
SIGNED_FIELDS: tuple[str, ...] = (
    "from", "sender", "to", "cc", "subject", "date", "message-id", "reply-to",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post")
#: Listed once more than present (also when absent): nobody may add one in transit.
OVERSIGNED_FIELDS: frozenset[str] = frozenset({
    "from", "to", "cc", "subject", "date", "message-id", "reply-to",
    "list-unsubscribe", "list-unsubscribe-post"})

#: The names as dkimpy's relaxed canonicalisation writes them, to pick the fields worth it.
_SIGNED_NAMES: frozenset[bytes] = frozenset(f.encode() for f in SIGNED_FIELDS)

_POLICY = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_FOLD_AT = 76          # soft line length for the tag list
_B64_LINE = 72         # b= and bh= are wrapped onto lines of this many characters


class SigningError(PermanentFailure):
    """The message cannot be DKIM-signed (its header block does not parse)."""

    code = 554
    status = "5.6.0"


@dataclass(frozen=True)
class SigningKey:
    """One private key ready to sign for `domain` with `selector`."""

    domain: str
    selector: str
    algorithm: Algorithm
    key: PrivateKey
    expire_after: float | None = None

    def sign_digest(self, digest: bytes) -> bytes:
        """The raw signature of a SHA-256 digest (RSA PKCS#1 v1.5, or PureEd25519 over it)."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        assert isinstance(self.key, ed25519.Ed25519PrivateKey)
        return self.key.sign(digest)


def _from_domain(headers: Sequence[Sequence[bytes]]) -> str | None:
    values = [bytes(v).decode("utf-8", "replace") for n, v in headers if n.lower() == b"from"]
    for _, addr in getaddresses(values):
        if "@" in addr:
            return domain_of(addr).strip().rstrip(".") or None
    return None


def parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` result, without splitting and re-joining every body line.

    For a message whose every LF is part of a CRLF (the relay refuses bare LF) the body
    dkimpy would return is the bytes after the first empty line (`split_entity`), so
    only the header block goes through dkimpy; anything else (no empty line, a bare
    LF) takes dkimpy's own path.
    """
    header, blank, body = split_entity(message)
    if not blank or message.count(b"\n") != message.count(b"\r\n"):
        headers, whole_body = dkim.rfc822_parse(message)
        return headers, whole_body
    headers, _ = dkim.rfc822_parse(header)
    return headers, body


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalisation; equal to dkimpy's ``Relaxed``.

    dkimpy runs two regular expressions over the whole body (about 0.6 ms for 10 KB of
    text with runs of spaces); here runs of SP and HTAB become one SP by `bytes.replace`
    passes (each run halves per pass, so a few passes over the body in C), after which
    whitespace at a line end is a single SP before CRLF and goes by one more replace;
    dkimpy's own helpers finish the job.
    """
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    result: bytes = correct_empty_body(strip_trailing_lines(body))
    return result


def header_list(names: Iterable[bytes]) -> list[bytes]:
    """The `h=` list for a message whose header field names are `names` (see module doc)."""
    counts: dict[str, int] = {}
    for n in names:
        low = n.decode("ascii", "replace").lower().strip()
        counts[low] = counts.get(low, 0) + 1
    out: list[bytes] = []
    for field in SIGNED_FIELDS:
        times = counts.get(field, 0) + (1 if field in OVERSIGNED_FIELDS else 0)
        out.extend([field.encode()] * times)
    return out


def _wrap(value: bytes, width: int = _B64_LINE) -> bytes:
    return b"\r\n\t".join(value[i:i + width] for i in range(0, len(value), width)) or b""


def _fold_tags(tags: Sequence[bytes], first: int) -> bytes:
    """Join `tag=value` items with "; ", starting a new line (CRLF TAB) before the width."""
    out = b""
    col = first
    for i, tag in enumerate(tags):
        piece = tag + (b";" if i < len(tags) - 1 else b"")
        if out and col + 1 + len(piece) > _FOLD_AT:
            out += b"\r\n\t"
            col = 8
        elif out:
            out += b" "
            col += 1
        out += piece
        col += len(piece)
    return out


def _fold_h(names: Sequence[bytes]) -> bytes:
    """`h=` value folded at colons so that no line grows past the width."""
    lines: list[bytes] = []
    line = b"h="
    for i, n in enumerate(names):
        piece = n + (b":" if i < len(names) - 1 else b"")
        if len(line) + len(piece) > _FOLD_AT - 8 and line != b"h=":
            lines.append(line)
            line = b""
        line += piece
    lines.append(line)
    return b"\r\n\t".join(lines)


class Signer:
    """Signs messages with every key configured for the sender's domain (or a parent domain)."""

    def __init__(self, keys: Mapping[str, Sequence[SigningKey]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys: dict[str, tuple[SigningKey, ...]] = {
            d.lower().rstrip("."): tuple(ks) for d, ks in keys.items() if ks}
        self._clock = clock

    @classmethod
    def from_config(cls, cfg: Config, *, clock: Callable[[], float] = time.time) -> Signer:
        """Load every key in `cfg.dkim` once; ConfigError naming the key on any problem."""
        problems: list[Problem] = []
        keys: dict[str, list[SigningKey]] = {}
        for domain, entries in cfg.dkim.items():
            for i, entry in enumerate(entries):
                where = f"dkim.{domain}" + (f"[{i}]" if len(entries) > 1 else "") + ".key_file"
                try:
                    key = load_private_key(read_secret_bytes(entry.key_file, cfg.base_dir))
                except (OSError, KeyFileError) as exc:
                    problems.append(Problem(cfg.source, None, where,
                                            f"{entry.key_file}: {getattr(exc, 'strerror', None) or exc}"))
                    continue
                if algorithm_for(key) != entry.algorithm:
                    problems.append(Problem(cfg.source, None, where,
                                            f"algorithm {entry.algorithm} does not fit the "
                                            f"{algorithm_for(key)} key in {entry.key_file}"))
                    continue
                keys.setdefault(domain, []).append(SigningKey(
                    domain=domain, selector=entry.selector, algorithm=entry.algorithm, key=key,
                    expire_after=entry.expire_after))
        if problems:
            raise ConfigError(problems)
        return cls(keys, clock=clock)

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys for `domain` or its nearest configured parent domain (empty if none)."""
        found = nearest_domain(domain, self._keys)
        return self._keys[found] if found is not None else ()

    def signature_headers(self, message: bytes, domain: str | None = None) -> list[bytes]:
        """The DKIM-Signature header fields (each ending in CRLF) for `message`.

        `domain` defaults to the From address's domain; no key for it (or no From):
        an empty list. SigningError when the header block cannot be parsed.
        """
        try:
            headers, body = parse(message)
        except dkim.MessageFormatError as exc:
            raise SigningError(f"cannot DKIM-sign: {exc}") from None
        domain = domain or _from_domain(headers)
        if not domain:
            return []
        keys = self.keys_for(domain)
        if not keys:
            return []
        names = header_list(n for n, _ in headers)
        # only fields named in h= are ever hashed (dkimpy selects by canonical name, each
        # instance searched from the bottom among fields of that name), so the others
        # need no canonicalising
        canon_headers = _POLICY.canonicalize_headers(
            [h for h in headers if bytes(h[0]).lower().rstrip() in _SIGNED_NAMES])
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        now = int(self._clock())
        return [self._one(k, canon_headers, names, bh, now) for k in keys]

    def sign(self, message: bytes, domain: str | None = None) -> bytes:
        """`message` with its DKIM-Signature field(s) prepended (unchanged when no key applies)."""
        return b"".join(self.signature_headers(message, domain)) + message

    @staticmethod
    def _one(key: SigningKey, canon_headers: Any, names: list[bytes], bh: bytes, now: int) -> bytes:
        tags = [b"v=1", b"a=" + key.algorithm.encode(), b"c=relaxed/relaxed",
                b"d=" + key.domain.encode("idna"), b"s=" + key.selector.encode(),
                b"t=%d" % now]
        if key.expire_after:
            tags.append(b"x=%d" % (now + int(key.expire_after)))
        value = (b" " + _fold_tags(tags, len(b"DKIM-Signature: ")) + b";\r\n\t"
                 + _fold_h(names) + b";\r\n\tbh=" + bh + b";\r\n\tb=")
        hasher = hashlib.sha256()
        # dkimpy's own header hashing, exactly what its verifier recomputes
        dkim.hash_headers(hasher, _POLICY, canon_headers, list(names),
                          (b"DKIM-Signature", value), {})
        sig = base64.b64encode(key.sign_digest(hasher.digest()))
        return b"DKIM-Signature:" + value + _wrap(sig) + b"\r\n"
