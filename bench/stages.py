#!/usr/bin/env python3
"""Stage benchmark: per-copy CPU time of `gateway.pipeline.stages.transform`, figures on stdout.

Its one job: time one recipient's copy going through the outbound stages (signature,
disclaimer, links, pixel) for two realistic messages, and print p50/p99/mean in µs:

- ``10k-html``: ~10 KB multipart/alternative (text/plain + quoted-printable HTML
  newsletter with a table layout) and 20 links;
- ``200k-attach``: the same body inside multipart/mixed with a ~90 KB PDF and a ~90 KB
  PNG attachment (base64), i.e. ~200 KB on the wire.

Each message is timed with click + open tracking, with tracking plus a signature and
disclaimer, and with settings that change nothing but still parse the message (click
tracking on a copy without trackable links: the "untouched copy" path). A fresh copy id
is used per iteration, as the relay would. It is a benchmark, not a test: nothing is
asserted except that the output changed when it should.

    PYTHONPATH=. python3 bench/stages.py                 # 2000 iterations per row
    PYTHONPATH=. python3 bench/stages.py -n 500 --json
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.ids import new_queue_id
from gateway.pipeline.stages import CopyContext, StageSettings, transform
from gateway.tracking.tokens import TokenSigner


def qp(data: bytes) -> bytes:
    return b"\r\n".join(binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=\r\n")
                        for line in data.split(b"\r\n"))


def b64(data: bytes) -> bytes:
    enc = base64.b64encode(data)
    return b"\r\n".join(enc[i:i + 76] for i in range(0, len(enc), 76))


def html_body(links: int = 20, target: int = 10_000) -> str:
    rows = []
    for i in range(links):
        rows.append(
            f'<tr><td style="padding:8px 16px;font-family:Arial,sans-serif;font-size:14px;color:#333333">'
            f'<a href="https://shop.example.com/products/{i}?utm_source=newsletter&amp;utm_medium=email'
            f'&amp;utm_campaign=spring" style="color:#0066cc;text-decoration:none">Product {i}</a> — '
            f"Our best offer this season, now with free shipping.</td></tr>\r\n")
    head = ("<!DOCTYPE html>\r\n<html><head><meta charset=\"utf-8\"><title>Spring</title>\r\n"
            "<style>td{font-family:Arial} .btn{background:#0066cc}</style></head>\r\n"
            '<body style="margin:0;padding:0"><table width="600" cellpadding="0" cellspacing="0">\r\n')
    doc = head + "".join(rows)
    filler = ('<tr><td style="padding:4px 16px;color:#777777">'
              "Lorem ipsum dolor sit amet, consectetur.</td></tr>\r\n")
    while len(doc) < target - 40:
        doc += filler
    return doc + "</table></body></html>\r\n"


def message(attachments: bool) -> bytes:
    html = html_body().encode()
    text = b"Spring offers: https://shop.example.com/\r\n" * 20
    alt = (b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
           + qp(text) + b"\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp(html) + b"\r\n--alt--\r\n")
    head = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: Spring offers\r\n"
            b"Date: Mon, 02 Mar 2026 10:00:00 +0100\r\nMessage-ID: <bench@example.com>\r\n"
            b"MIME-Version: 1.0\r\n")
    if not attachments:
        return head + alt
    rnd = os.urandom(90_000)
    return (head + b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n--mix\r\n' + alt
            + b'\r\n--mix\r\nContent-Type: application/pdf; name="offer.pdf"\r\n'
              b'Content-Disposition: attachment; filename="offer.pdf"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\n"
            + b64(rnd) + b'\r\n--mix\r\nContent-Type: image/png; name="chart.png"\r\n'
              b'Content-Disposition: attachment; filename="chart.png"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\n"
            + b64(rnd[::-1]) + b"\r\n--mix--\r\n")


def measure(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(50, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def pct(sorted_us: list[float], p: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, max(0, round(p / 100 * len(sorted_us) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--iterations", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    signer = TokenSigner([b"bench-key-0123456789abcdef"])
    base = "https://t.example.com"
    track = StageSettings(track_opens=True, track_clicks=True)
    full = StageSettings(track_opens=True, track_clicks=True,
                         signature_html="<p>Alice Smith<br>Account Executive<br>+1 555 0100</p>",
                         signature_text="Alice Smith\nAccount Executive\n+1 555 0100",
                         disclaimer_html="<p style=\"font-size:10px\">Confidential.</p>",
                         disclaimer_text="Confidential.")
    clicks_only = StageSettings(track_clicks=True)
    rows = []
    for name, attach in (("10k-html", False), ("200k-attach", True)):
        raw = message(attach)
        nothing = raw.replace(b'<a href="https://shop', b'<a href="mailto:shop') \
            .replace(b'<a href=3D"https://shop', b'<a href=3D"mailto:shop')
        for label, s, data in (("track", track, raw), ("track+sig", full, raw),
                               ("untouched", clicks_only, nothing)):
            sample = transform(data, CopyContext("bob@example.net", new_queue_id(), s, base, signer))
            assert sample.changed == (label != "untouched"), (name, label)
            if label == "track":
                assert len(sample.report.links) == 20
            iters = args.iterations if not attach else max(1, args.iterations // 4)
            def one(d: bytes = data, st: StageSettings = s) -> object:
                return transform(d, CopyContext("bob@example.net", new_queue_id(), st, base, signer))
            times = sorted(measure(one, iters))
            rows.append({"message": name, "bytes": len(data), "settings": label, "iterations": iters,
                         "p50_us": round(pct(times, 50), 1), "p99_us": round(pct(times, 99), 1),
                         "mean_us": round(statistics.fmean(times), 1), "out_bytes": len(sample.data)})
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=2))
        return 0
    print(f"# transform() per recipient copy, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'message':<12} {'bytes':>8} {'settings':<10} {'n':>6} "
          f"{'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9}")
    for r in rows:
        print(f"{r['message']:<12} {r['bytes']:>8} {r['settings']:<10} {r['iterations']:>6} "
              f"{r['p50_us']:>9} {r['p99_us']:>9} {r['mean_us']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
