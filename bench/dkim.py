#!/usr/bin/env python3
"""DKIM signing benchmark: dkimpy's own RSA against mailgw's Signer, and ed25519.

Its one job: sign the same ~10 KB multipart message N times with each method and print
signatures/s and µs per signature (median of 5 rounds, each round timed as a whole):

* ``dkimpy rsa-sha256``: ``dkim.sign(...)`` as shipped — dkimpy parses the PEM and
  computes RSA in pure Python (``dkim.crypto.RSASSA_PKCS1_v1_5_sign``);
* ``mailgw rsa-sha256``: :class:`gateway.pipeline.dkim.Signer` — dkimpy's parser and
  canonicaliser, RSA through ``cryptography`` (OpenSSL);
* ``dkimpy ed25519-sha256`` (needs PyNaCl) and ``mailgw ed25519-sha256``;
* ``mailgw both``: one call that adds an ed25519 and an RSA signature.

Every figure covers the whole call (parse, canonicalise, hash, sign, build the header).
Each signature made is checked once with ``dkim.verify`` before timing. Nothing is
asserted; the figures go to stdout (``--json`` for one JSON object).

    python3 bench/dkim.py                 # 2048-bit RSA, 200 signatures per round
    python3 bench/dkim.py --bits 4096 -n 100 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This file is named dkim.py: take its own directory off the path so `import dkim` is dkimpy.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from gateway.keys import dkim as dkimkeys  # noqa: E402
from gateway.pipeline.dkim import Signer, SigningKey  # noqa: E402


def message() -> bytes:
    html = b"<p>" + b"Hello there, this is a line of the proposal. " * 180 + b"</p>\r\n"
    text = b"Hello there, this is a line of the proposal.\r\n" * 40
    return (b"From: Alice Example <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
            b"Subject: Proposal for Q3\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text
            + b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + b"--b--\r\n")


def timed(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    """Median seconds per call over `rounds` rounds of `n` calls."""
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter() - t0) / n)
    return statistics.median(per_call)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=2048, help="RSA key length (default 2048)")
    ap.add_argument("-n", type=int, default=200, help="signatures per round (default 200)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    msg = message()
    rsa_key = dkimkeys.generate("rsa-sha256", args.bits)
    ed_key = dkimkeys.generate("ed25519-sha256")
    pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    records = {b"r._domainkey.example.com.": dkimkeys.dns_record(rsa_key).encode(),
               b"e._domainkey.example.com.": dkimkeys.dns_record(ed_key).encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    ours_rsa = Signer({"example.com": [SigningKey("example.com", "r", "rsa-sha256", rsa_key)]})
    ours_ed = Signer({"example.com": [SigningKey("example.com", "e", "ed25519-sha256", ed_key)]})
    ours_both = Signer({"example.com": [SigningKey("example.com", "e", "ed25519-sha256", ed_key),
                                        SigningKey("example.com", "r", "rsa-sha256", rsa_key)]})
    cases: dict[str, Callable[[], bytes]] = {
        "dkimpy rsa-sha256": lambda: dkim.sign(msg, b"r", b"example.com", pem,
                                               canonicalize=(b"relaxed", b"relaxed")) + msg,
        "mailgw rsa-sha256": lambda: ours_rsa.sign(msg),
        "mailgw ed25519-sha256": lambda: ours_ed.sign(msg),
        "mailgw both (2 signatures)": lambda: ours_both.sign(msg),
    }
    try:
        import nacl.encoding  # noqa: F401

        seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        import base64

        ed_seed = base64.b64encode(seed)
        cases["dkimpy ed25519-sha256 (PyNaCl)"] = lambda: dkim.sign(
            msg, b"e", b"example.com", ed_seed, signature_algorithm=b"ed25519-sha256",
            canonicalize=(b"relaxed", b"relaxed")) + msg
    except ImportError:
        print("PyNaCl not installed: no dkimpy ed25519 row", file=sys.stderr)

    for name, fn in cases.items():
        signed = fn()
        d = dkim.DKIM(signed)
        n_sigs = sum(1 for h, _ in d.headers if h.lower() == b"dkim-signature")
        ok = all(d.verify(idx=i, dnsfunc=dnsfunc) for i in range(n_sigs))
        if not ok:
            print(f"{name}: the signature does not verify", file=sys.stderr)
            return 1

    results = {}
    for name, fn in cases.items():
        n = max(5, args.n // 10) if name.startswith("dkimpy rsa") else args.n
        sec = timed(fn, n)
        results[name] = {"per_sec": 1 / sec, "us": sec * 1e6, "calls_per_round": n}
    base = results["dkimpy rsa-sha256"]["us"]
    if args.json:
        print(json.dumps({"rsa_bits": args.bits, "message_bytes": len(msg), "results": results},
                         indent=2))
        return 0
    print(f"DKIM signing, {len(msg)} byte message, RSA {args.bits} bits "
          f"(median of 5 rounds; whole sign() call)")
    print(f"{'method':<32}{'sign/s':>10}{'µs/call':>12}{'vs dkimpy rsa':>15}")
    for name, r in results.items():
        print(f"{name:<32}{r['per_sec']:>10.0f}{r['us']:>12.0f}{base / r['us']:>14.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
