"""DKIM keys: load and check private keys, make new ones, and write or read the DNS record.

Private key files may be PEM (PKCS#8 ``BEGIN PRIVATE KEY`` or PKCS#1 ``BEGIN RSA PRIVATE
KEY``, unencrypted) or, for ed25519, the base64 32-byte seed that dkimpy's ``dknewkey
--ktype ed25519`` writes. The DNS record (RFC 6376 §3.6.1, RFC 8463 §4) carries for RSA
the base64 DER SubjectPublicKeyInfo and for ed25519 the base64 raw 32-byte public key::

    s2026r._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBg..."

Everything here is pure (bytes in, values out) except :func:`write_private_key`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: RSA keys shorter than this are refused (RFC 8301 §3.2: verifiers MUST NOT accept < 1024).
MIN_RSA_BITS = 1024
#: RSA keys shorter than this get a warning (RFC 8301 §3.2: signers SHOULD use >= 2048).
RECOMMENDED_RSA_BITS = 2048
#: Longest character-string in a TXT record (RFC 1035 §3.3.14).
TXT_CHUNK = 255


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says why (shown with file, line and key)."""


def key_type(key: PrivateKey) -> Literal["rsa", "ed25519"]:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"


def algorithm_for(key: PrivateKey) -> Algorithm:
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def load_private_key(data: bytes) -> PrivateKey:
    """Parse a private key file's bytes; raise :class:`KeyFileError` saying what is wrong."""
    text = data.strip()
    if not text:
        raise KeyFileError("the key file is empty")
    if b"-----BEGIN" in text:
        if b"PUBLIC KEY-----" in text and b"PRIVATE KEY-----" not in text:
            raise KeyFileError("this is a public key; key_file needs the private key")
        if b"ENCRYPTED" in text:
            raise KeyFileError("the private key is encrypted; mailgw needs it unencrypted (protect the file)")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"not a PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"unsupported key type {type(key).__name__}: DKIM uses RSA or ed25519")
        return key
    # dkimpy's dknewkey --ktype ed25519: one line, the base64 of the 32-byte seed
    if re.fullmatch(rb"[A-Za-z0-9+/]{43}=", text):
        try:
            seed = base64.b64decode(text, validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) == 32:
            return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise KeyFileError("not a private key (expected PEM, or the base64 ed25519 seed dknewkey writes)")


def check_key(key: PrivateKey, algorithm: Algorithm) -> tuple[list[str], list[str]]:
    """(errors, warnings) about using `key` for `algorithm`."""
    errors: list[str] = []
    warnings: list[str] = []
    if algorithm_for(key) != algorithm:
        errors.append(f"algorithm is {algorithm} but the file holds an {key_type(key)} key "
                      f"(use algorithm: {algorithm_for(key)})")
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            errors.append(f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} are needed "
                          f"(receivers ignore shorter keys, RFC 8301)")
        elif key.key_size < RECOMMENDED_RSA_BITS:
            warnings.append(f"RSA key of {key.key_size} bits: use {RECOMMENDED_RSA_BITS} or more "
                            f"(RFC 8301)")
    return errors, warnings


def generate(algorithm: Algorithm, bits: int = 2048) -> PrivateKey:
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file itself is 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write `key` to `path` with mode 0600; never overwrite (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))
        fh.flush()
        os.fsync(fh.fileno())


def public_key_b64(key: PrivateKey) -> str:
    """The `p=` value: base64 SubjectPublicKeyInfo (RSA) or the raw 32-byte key (ed25519)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        der = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return base64.b64encode(der).decode("ascii")


def dns_record(key: PrivateKey) -> str:
    """The TXT record's text: ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k={key_type(key)}; p={public_key_b64(key)}"


def dns_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain.rstrip('.')}."


def zone_line(selector: str, domain: str, key: PrivateKey) -> str:
    """A zone-file line with the record split into quoted strings of at most 255 characters."""
    text = dns_record(key)
    chunks = [text[i:i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)]
    return f"{dns_name(selector, domain)} IN TXT " + " ".join(f'"{c}"' for c in chunks)


@dataclass(frozen=True)
class PublishedKey:
    """What a published DKIM TXT record says (tags lower-cased as RFC 6376 §3.2 allows)."""

    tags: dict[str, str]

    @property
    def key_type(self) -> str:
        return self.tags.get("k", "rsa").lower()

    @property
    def public_key(self) -> str:
        return re.sub(r"\s+", "", self.tags.get("p", ""))

    @property
    def revoked(self) -> bool:
        return "p" in self.tags and self.public_key == ""


def parse_record(text: str) -> PublishedKey:
    """Parse a DKIM key record (the TXT strings concatenated); ValueError if malformed."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ValueError(f"malformed tag {part[:40]!r}")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")
        tags[name] = value.strip()
    if "v" in tags and tags["v"] != "DKIM1":
        raise ValueError(f"v={tags['v']}: expected v=DKIM1")
    if "p" not in tags:
        raise ValueError("no p= tag (public key)")
    return PublishedKey(tags)


def matches(published: PublishedKey, key: PrivateKey) -> tuple[bool, str]:
    """(True, "") when the record publishes `key`'s public half, else (False, why)."""
    if published.revoked:
        return False, "the record has an empty p=: the key is revoked"
    if published.key_type != key_type(key):
        return False, f"the record says k={published.key_type}, the key is {key_type(key)}"
    try:
        raw = base64.b64decode(published.public_key, validate=True)
    except binascii.Error:
        return False, "p= is not valid base64"
    if isinstance(key, rsa.RSAPrivateKey):
        try:
            pub = serialization.load_der_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            return False, "p= is not an RSA public key"
        if not isinstance(pub, rsa.RSAPublicKey):
            return False, "p= is not an RSA public key"
        if pub.public_numbers() != key.public_key().public_numbers():
            return False, "p= is a different RSA key than key_file"
        return True, ""
    if raw != base64.b64decode(public_key_b64(key)):
        return False, "p= is a different ed25519 key than key_file"
    return True, ""
