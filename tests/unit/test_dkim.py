"""DKIM signing verified by dkimpy: algorithms, header choice, alignment, keys and config checks."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import Relaxed as RelaxedCanonicalization
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.errors import ConfigError, Problem
from gateway.keys import dkim as dkimkeys
from gateway.pipeline import dkim as ours
from gateway.pipeline.dkim import Signer, SigningError, SigningKey, header_list, parse, relaxed_body
from tests.conftest import require_module

require_module("nacl", "PyNaCl: dkimpy verifies ed25519 with it (test extra)")

#: A 512-bit RSA key (PKCS#1) for the "too short" check; cryptography refuses to make one.
SHORT_RSA = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBALiXICISb5CHQfNUoW6nQe60sWn6Gx1X9mxAUpz4vFEFWHIfHTFF
usifQAUq5xLBqz6arZJdN8nEAHYTyRzPskMCAwEAAQJAF4+KlW6++Laa72EU/dex
bbN4latLvLIWjPik0s5Y0wphHzhXArKHr786GNzCiAB+fJvp7fBMFbXqEobTjog/
iQIhAN4C5jSIFpT1JydR/N+azvqWM8HzG/hTxDVXdY+vmY2PAiEA1NmeBDP8bPif
6qtRq6JVV2oMzn3rpgtYZdakKKznXg0CIQCa2I7TqO+HKY4LgMXM997RLJ4g8n1Z
sKMzSTL36tRAxQIgVJXWkd0G51c2Vc+XORndyEtAo56u0uGXU4Ek43UyzNECIQCx
MoqjbNcYy5F6h0m5kISWgItjez63Jt1M4O4wbwYc/A==
-----END RSA PRIVATE KEY-----
"""

SIMPLE = (b"From: Alice Example <alice@example.com>\r\n"
          b"To: Bob <bob@example.org>\r\n"
          b"Subject: Quarterly numbers\r\n"
          b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
          b"Message-ID: <m1@example.com>\r\n"
          b"\r\n"
          b"Hello Bob,\r\n\r\nsee you.  \r\n\r\n\r\n")

MULTIPART_8BIT = (
    b"Received: from client by gw; Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"From: =?utf-8?q?Ren=C3=A9?= <rene@sales.example.com>\r\n"
    b"To: a@example.org,\r\n  b@example.org,\r\n\tc@example.org\r\n"
    b"Cc: d@example.org\r\n"
    b"Subject: " + b"a very long subject line " * 8 + b"\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <m2@example.com>\r\n"
    b"References: <a@x> <b@x>\r\n\t<c@x>\r\n"
    b"List-Unsubscribe: <https://example.com/u?x=1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, caf\xc3\xa9 \t \r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"<p>Gr\xc3\xbc\xc3\x9fe</p>\r\n"
    b"--b1--\r\n")


@pytest.fixture(scope="module")
def rsa_key() -> dkimkeys.PrivateKey:
    return dkimkeys.generate("rsa-sha256", 2048)


@pytest.fixture(scope="module")
def ed_key() -> dkimkeys.PrivateKey:
    return dkimkeys.generate("ed25519-sha256")


def _dns(records: dict[str, dkimkeys.PrivateKey]) -> Callable[..., bytes | None]:
    table = {f"{name}.".encode(): dkimkeys.dns_record(k).encode() for name, k in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)
    return dnsfunc


def _verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    d = dkim.DKIM(message)
    n = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(n):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            out.append(False)
    return out


def _tags(message: bytes, idx: int = 0) -> dict[bytes, bytes]:
    d = dkim.DKIM(message)
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    return dict(dkim.util.parse_tag_value(sigs[idx]))


@pytest.mark.parametrize("message", [SIMPLE, MULTIPART_8BIT], ids=["simple", "multipart-8bit"])
@pytest.mark.parametrize("algs", [("rsa-sha256",), ("ed25519-sha256",),
                                  ("ed25519-sha256", "rsa-sha256")], ids=["rsa", "ed25519", "both"])
def test_dkimpy_verifies(message: bytes, algs: tuple[dkimkeys.Algorithm, ...], rsa_key: dkimkeys.PrivateKey,
                         ed_key: dkimkeys.PrivateKey) -> None:
    keys: dict[dkimkeys.Algorithm, tuple[str, dkimkeys.PrivateKey]] = {
        "rsa-sha256": ("r1", rsa_key), "ed25519-sha256": ("e1", ed_key)}
    signer = Signer({"example.com": [SigningKey("example.com", keys[a][0], a, keys[a][1])
                                     for a in algs]})
    signed = signer.sign(message)
    assert signed.endswith(message)  # only prepended: the original bytes are untouched
    dnsfunc = _dns({f"{keys[a][0]}._domainkey.example.com": keys[a][1] for a in algs})
    assert _verify_all(signed, dnsfunc) == [True] * len(algs)
    for i, alg in enumerate(algs):
        tags = _tags(signed, i)
        assert tags[b"a"] == alg.encode()
        assert tags[b"c"] == b"relaxed/relaxed"
        assert tags[b"d"] == b"example.com"
        assert b"l" not in tags and b"t" in tags
    # a tampered body fails every signature
    old, new = (b"Gr\xc3\xbc", b"Gr\xc3\xb6") if b"Gr\xc3\xbc" in message else (b"Hello Bob", b"Hello Rob")
    tampered = signed.replace(old, new)
    assert tampered != signed
    assert _verify_all(tampered, dnsfunc) == [False] * len(algs)


def test_from_oversigned_and_added_headers_break(rsa_key: dkimkeys.PrivateKey) -> None:
    signer = Signer({"example.com": [SigningKey("example.com", "r1", "rsa-sha256", rsa_key)]})
    signed = signer.sign(SIMPLE)
    dnsfunc = _dns({"r1._domainkey.example.com": rsa_key})
    h = _tags(signed)[b"h"].replace(b" ", b"").replace(b"\r\n", b"").replace(b"\t", b"").split(b":")
    assert h.count(b"from") == 2 and h.count(b"subject") == 2
    assert h.count(b"reply-to") == 1  # absent but over-signed: none may be added
    assert b"received" not in h and b"dkim-signature" not in h
    head, _, body = signed.partition(b"\r\n\r\n")
    for extra in (b"From: Mallory <m@evil.example>", b"Reply-To: m@evil.example",
                  b"Subject: changed"):
        assert _verify_all(head + b"\r\n" + extra + b"\r\n\r\n" + body, dnsfunc) == [False]
    # an unsigned trace header added in transit does not matter
    assert _verify_all(b"Received: from x by y; Mon, 01 Jan 2024 10:00:01 +0000\r\n" + signed,
                       dnsfunc) == [True]


def test_header_list_rules() -> None:
    names = [b"Received", b"From", b"To", b"Subject", b"X-Mailer", b"Content-Type",
             b"Received", b"To"]
    h = header_list(names)
    assert h.count(b"to") == 3 and h.count(b"from") == 2
    assert h.count(b"content-type") == 1  # signed, not over-signed
    assert h.count(b"references") == 0     # absent and not over-signed
    assert b"received" not in h and b"x-mailer" not in h


def test_existing_signature_stays_valid(rsa_key: dkimkeys.PrivateKey,
                                        ed_key: dkimkeys.PrivateKey) -> None:
    # the customer's own system signed first (dkimpy, another domain), then we sign
    other = dkimkeys.generate("rsa-sha256", 1024)
    pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    first = dkim.sign(MULTIPART_8BIT, b"crm", b"vendor.example", pem,
                      canonicalize=(b"relaxed", b"relaxed")) + MULTIPART_8BIT
    signer = Signer({"example.com": [SigningKey("example.com", "e1", "ed25519-sha256", ed_key),
                                     SigningKey("example.com", "r1", "rsa-sha256", rsa_key)]})
    signed = signer.sign(first)
    dnsfunc = _dns({"crm._domainkey.vendor.example": other,
                    "e1._domainkey.example.com": ed_key, "r1._domainkey.example.com": rsa_key})
    assert _verify_all(signed, dnsfunc) == [True, True, True]
    assert [_tags(signed, i)[b"d"] for i in range(3)] == [b"example.com", b"example.com",
                                                          b"vendor.example"]


def test_parent_domain_alignment_and_no_key(rsa_key: dkimkeys.PrivateKey) -> None:
    signer = Signer({"example.com": [SigningKey("example.com", "r1", "rsa-sha256", rsa_key)]})
    # From is rene@sales.example.com: signed with d=example.com
    signed = signer.sign(MULTIPART_8BIT)
    assert _tags(signed)[b"d"] == b"example.com"
    assert signer.keys_for("Deep.Sales.Example.COM.")
    assert not signer.keys_for("example.community")
    other = SIMPLE.replace(b"alice@example.com", b"alice@elsewhere.test")
    assert signer.sign(other) == other          # no key for that domain: unchanged
    assert signer.sign(SIMPLE, "elsewhere.test") == SIMPLE
    assert signer.sign(b"Subject: no from\r\n\r\nx\r\n") == b"Subject: no from\r\n\r\nx\r\n"


def test_timestamp_and_expiry(ed_key: dkimkeys.PrivateKey) -> None:
    signer = Signer({"example.com": [SigningKey("example.com", "e1", "ed25519-sha256", ed_key,
                                                expire_after=7 * 86400)]},
                    clock=lambda: 1_700_000_000.5)
    tags = _tags(signer.sign(SIMPLE))
    assert tags[b"t"] == b"1700000000"
    assert tags[b"x"] == str(1_700_000_000 + 7 * 86400).encode()


def test_lines_stay_short(rsa_key: dkimkeys.PrivateKey) -> None:
    signer = Signer({"example.com": [SigningKey("example.com", "r1", "rsa-sha256", rsa_key)]})
    header = signer.signature_headers(MULTIPART_8BIT)[0]
    assert header.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert header.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    assert b"\n" not in header.replace(b"\r\n", b"")


def test_unparseable_header_is_a_permanent_error(rsa_key: dkimkeys.PrivateKey) -> None:
    signer = Signer({"example.com": [SigningKey("example.com", "r1", "rsa-sha256", rsa_key)]})
    with pytest.raises(SigningError) as ei:
        signer.sign(b"From: a@example.com\r\nthis is no header\r\n\r\nbody\r\n")
    assert ei.value.code == 554 and ei.value.status == "5.6.0"


# -- keys --------------------------------------------------------------------------------


def test_key_formats(rsa_key: dkimkeys.PrivateKey, ed_key: dkimkeys.PrivateKey) -> None:
    pkcs1 = rsa_key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY")
    pkcs8 = dkimkeys.private_pem(rsa_key)
    assert pkcs8.startswith(b"-----BEGIN PRIVATE KEY")
    for data in (pkcs1, pkcs8):
        assert dkimkeys.dns_record(dkimkeys.load_private_key(data)) == dkimkeys.dns_record(rsa_key)
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    loaded = dkimkeys.load_private_key(base64.b64encode(seed) + b"\n")  # dknewkey's format
    assert dkimkeys.dns_record(loaded) == dkimkeys.dns_record(ed_key)
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", dkimkeys.dns_record(ed_key))
    pub = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad, why in ((b"", "empty"), (pub, "public key"), (b"hello", "not a private key"),
                     (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM")):
        with pytest.raises(dkimkeys.KeyFileError, match=why):
            dkimkeys.load_private_key(bad)


def test_zone_line_splits_strings(rsa_key: dkimkeys.PrivateKey) -> None:
    line = dkimkeys.zone_line("s1", "example.com", dkimkeys.generate("rsa-sha256", 4096))
    assert line.startswith('s1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) >= 3 and all(len(s) <= 255 for s in strings)
    published = dkimkeys.parse_record("".join(strings))
    assert published.key_type == "rsa"
    assert dkimkeys.matches(published, rsa_key)[0] is False
    assert dkimkeys.matches(dkimkeys.parse_record(dkimkeys.dns_record(rsa_key)), rsa_key) == (True, "")
    assert "revoked" in dkimkeys.matches(dkimkeys.parse_record("v=DKIM1; k=rsa; p="), rsa_key)[1]
    with pytest.raises(ValueError):
        dkimkeys.parse_record("v=DKIM2; p=abc")
    with pytest.raises(ValueError):
        dkimkeys.parse_record("v=DKIM1; k=rsa")


# -- configuration -----------------------------------------------------------------------


def _write_keys(tmp_path: Path, rsa_key: dkimkeys.PrivateKey, ed_key: dkimkeys.PrivateKey) -> None:
    (tmp_path / "r.pem").write_bytes(dkimkeys.private_pem(rsa_key))
    (tmp_path / "e.pem").write_bytes(dkimkeys.private_pem(ed_key))
    (tmp_path / "short.pem").write_bytes(SHORT_RSA)
    (tmp_path / "k1024.pem").write_bytes(dkimkeys.private_pem(dkimkeys.generate("rsa-sha256", 1024)))
    (tmp_path / "junk.pem").write_text("not a key\n")


def test_config_forms_and_signer(tmp_path: Path, rsa_key: dkimkeys.PrivateKey,
                                 ed_key: dkimkeys.PrivateKey) -> None:
    _write_keys(tmp_path, rsa_key, ed_key)
    p = tmp_path / "gateway.yaml"
    p.write_text("""dkim:
  example.com:
    - {selector: s2026r, key_file: r.pem, algorithm: rsa-sha256}
    - {selector: s2026e, key_file: e.pem, algorithm: ed25519-sha256, expire_after: 7d}
  Other.Example.:
    selector: s1
    key_file: r.pem
""")
    cfg = load_config(p)
    assert [k.selector for k in cfg.dkim["example.com"]] == ["s2026r", "s2026e"]
    assert cfg.dkim["example.com"][1].expire_after == 7 * 86400
    assert [k.selector for k in cfg.dkim["other.example"]] == ["s1"]
    signer = Signer.from_config(cfg)
    assert [k.algorithm for k in signer.keys_for("example.com")] == ["rsa-sha256", "ed25519-sha256"]
    signed = signer.sign(SIMPLE)
    dnsfunc = _dns({"s2026r._domainkey.example.com": rsa_key, "s2026e._domainkey.example.com": ed_key})
    assert _verify_all(signed, dnsfunc) == [True, True]


def test_config_key_problems_name_file_line_key(tmp_path: Path, rsa_key: dkimkeys.PrivateKey,
                                                ed_key: dkimkeys.PrivateKey) -> None:
    _write_keys(tmp_path, rsa_key, ed_key)
    p = tmp_path / "gateway.yaml"
    p.write_text("""dkim:
  a.example:
    - {selector: s1, key_file: missing.pem}
    - {selector: s2, key_file: junk.pem}
  b.example:
    selector: s1
    key_file: short.pem
  c.example:
    - {selector: s1, key_file: e.pem, algorithm: rsa-sha256}
    - {selector: s1, key_file: r.pem}
""")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = [str(x) for x in ei.value.problems]
    assert any(s.startswith(f"{p}:3: dkim.a.example[0].key_file: cannot read missing.pem") for s in lines)
    assert any(s.startswith(f"{p}:4: dkim.a.example[1].key_file: junk.pem: not a private key")
               for s in lines)
    assert any(s.startswith(f"{p}:7: dkim.b.example.key_file: short.pem: RSA key of 512 bits")
               for s in lines)
    assert any(s.startswith(f"{p}:9: dkim.c.example[0].key_file: e.pem: algorithm is rsa-sha256 "
                            "but the file holds an ed25519 key") for s in lines)
    assert any(s.startswith(f"{p}:10: dkim.c.example[1].selector: selector 's1' is used twice")
               for s in lines)
    assert len(lines) == 5, lines


def test_config_warns_on_1024_bit_keys(tmp_path: Path, rsa_key: dkimkeys.PrivateKey,
                                       ed_key: dkimkeys.PrivateKey) -> None:
    _write_keys(tmp_path, rsa_key, ed_key)
    p = tmp_path / "gateway.yaml"
    p.write_text("dkim:\n  example.com: {selector: s1, key_file: k1024.pem}\n")
    warnings: list[Problem] = []
    cfg = load_config(p, warnings)
    assert cfg.dkim["example.com"][0].selector == "s1"
    assert [str(w) for w in warnings] == [
        f"{p}:2: dkim.example.com.key_file: k1024.pem: RSA key of 1024 bits: use 2048 or more (RFC 8301)"]


def test_config_rejects_bad_domain_and_selector(tmp_path: Path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("dkim:\n  example.com: {selector: 'bad selector', key_file: x.pem}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert f"{p}:2: dkim.example.com.selector:" in str(ei.value)
    p.write_text("dkim:\n  'not a domain': {selector: s1, key_file: x.pem}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "is not a domain name" in str(ei.value)


# -- the fast paths equal dkimpy's -----------------------------------------------------------

_BODY_ATOMS = st.sampled_from([b"a", b"x y", b" ", b"  ", b"   ", b"\t", b" \t ", b"\t\t", b"\r\n",
                               b"\r\n\r\n", b"\xc3\xa9", b"=20", b".", b"\n", b"\r"])


@given(st.lists(_BODY_ATOMS, max_size=40).map(b"".join))
def test_relaxed_body_equals_dkimpy(body: bytes) -> None:
    assert relaxed_body(body) == RelaxedCanonicalization.canonicalize_body(body)


@given(st.lists(st.sampled_from([b"From: a@example.com\r\n", b"Subject:  x \t y\r\n", b" folded\r\n",
                                 b"\tfolded\r\n", b"To: b@example.org\r\n"]), min_size=1, max_size=6),
       st.lists(_BODY_ATOMS, max_size=30).map(b"".join), st.booleans())
def test_parse_equals_dkimpy(header: list[bytes], body: bytes, separator: bool) -> None:
    if header[0][:1] in (b" ", b"\t"):
        header = [b"X: y\r\n", *header]
    message = b"".join(header) + (b"\r\n" if separator else b"") + body
    try:
        expected = dkim.rfc822_parse(message)
    except dkim.MessageFormatError:
        with pytest.raises(dkim.MessageFormatError):
            parse(message)
        return
    assert parse(message) == expected


_FIELD_ATOMS = st.sampled_from([
    b"From: Alice <alice@example.com>\r\n", b"FROM:  Alice\t Two <alice@example.com>\r\n",
    b"To: bob@example.net\r\n", b"TO: carol@example.net,\r\n dave@example.net\r\n",
    b"Subject:  Hi \t there\r\n", b"Subject: second\r\n", b"X-Mailer: x\r\n",
    b"Received: from a by b;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n", b"X-Spam:   yes  \r\n",
    b"Message-ID: <m@example.com>\r\n", b"List-Unsubscribe: <https://u.example/>\r\n",
    b"Content-Type: text/plain;\r\n charset=utf-8\r\n", b"Comments: c\r\n"])


@given(st.lists(_FIELD_ATOMS, min_size=1, max_size=12))
def test_only_signed_fields_canonicalised_gives_dkimpys_header_hash(fields: list[bytes]) -> None:
    """Canonicalising only the h= fields hashes exactly what canonicalising all of them does
    (dkimpy picks each instance by name, from the bottom up)."""
    message = b"".join(fields) + b"\r\nbody\r\n"
    headers, _ = ours.parse(message)
    names = ours.header_list(n for n, _ in headers)
    sig = (b"DKIM-Signature", b" v=1; a=rsa-sha256; h=from; bh=x; b=")
    picked = [h for h in headers if bytes(h[0]).lower().rstrip() in ours._SIGNED_NAMES]
    digests = []
    for subset in (headers, picked):
        hasher = hashlib.sha256()
        dkim.hash_headers(hasher, ours._POLICY, ours._POLICY.canonicalize_headers(subset),
                          list(names), sig, {})
        digests.append(hasher.digest())
    assert digests[0] == digests[1]
