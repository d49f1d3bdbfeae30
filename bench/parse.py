#!/usr/bin/env python3
"""Parser benchmark: messages/s of gateway.mail on one core, figures on stdout.

Its one job: time `parse_message` on a ~10 KB HTML message (multipart/alternative,
text + HTML with a table, like bench/relay.py sends) and on a ~200 KB message with
attachments (multipart/mixed: the same body, a PDF, a PNG inline image and an attached
message/rfc822), plus `parse_headers` on the IMAP header block and `unwrap_forward` on a
Gmail forward; and, for scale, the stdlib alone (`email.message_from_bytes` with
`policy.default` + `get_body()` + `get_content()`) on the same bytes.

It is a benchmark, not a test: nothing is asserted.

    PYTHONPATH=. python3 bench/parse.py               # ~2 s per row
    PYTHONPATH=. python3 bench/parse.py --seconds 5 --json
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.mail.forward import unwrap_forward  # noqa: E402
from gateway.mail.parse import parse_headers, parse_message  # noqa: E402


def html_message(size: int = 10 * 1024) -> bytes:
    rows: list[str] = []
    n = 0
    while sum(len(r) for r in rows) < size * 0.6:
        rows.append(
            f"<tr><td>Item {n}</td><td>Seat licence, annual, tier {n % 4}</td>"
            f"<td style=\"text-align:right\">{120 + n}.00&nbsp;&euro;</td></tr>\n"
        )
        n += 1
    html = (
        "<html><head><style>td{padding:4px}</style></head><body><p>Hello Jane,</p>"
        "<p>here is the quote we discussed &mdash; see the table below.</p><table>\n"
        + "".join(rows)
        + "</table><p>Best regards,<br>Rep Smith</p></body></html>\n"
    )
    text = "Hello Jane,\n\nhere is the quote we discussed - see the table below.\n\n" + "\n".join(
        f"Item {i}  Seat licence, annual, tier {i % 4}  {120 + i}.00 EUR" for i in range(n)
    ) + "\n\nBest regards,\nRep Smith\n"
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "Rep Smith <rep@example.com>"
    msg["To"] = "Jane Customer <jane@customer.example>, buyer@customer.example"
    msg["Cc"] = "manager@example.com"
    msg["Subject"] = "Re: Quote for 40 seats \u2013 revised"
    msg["Date"] = "Mon, 16 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = "<bench-0001@example.com>"
    msg["In-Reply-To"] = "<CAJane0001@mail.customer.example>"
    msg["References"] = "<CAJane0000@mail.customer.example> <CAJane0001@mail.customer.example>"
    msg["List-Unsubscribe"] = "<mailto:unsubscribe@example.com>"
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def attachments_message(size: int = 200 * 1024) -> bytes:
    base = email.message_from_bytes(html_message(), policy=email.policy.SMTP)
    assert isinstance(base, EmailMessage)
    inner = email.message_from_bytes(html_message(4096), policy=email.policy.SMTP)
    pdf = b"%PDF-1.4\n" + os.urandom(int(size * 0.45)) + b"\n%%EOF\n"
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(int(size * 0.15))
    base.add_attachment(pdf, maintype="application", subtype="pdf", filename="Quote 2026.pdf")
    base.add_attachment(png, maintype="image", subtype="png", filename="chart.png", disposition="inline",
                        cid="<chart@example.com>")
    base.add_attachment(inner)
    return base.as_bytes()


def gmail_forward() -> bytes:
    return (REPO / "tests" / "data" / "mail" / "gmail_forward_html.eml").read_bytes()


def stdlib_default(raw: bytes) -> object:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    _ = (msg["From"], msg["To"], msg["Subject"], msg["Date"], msg["Message-ID"])
    body = msg.get_body(preferencelist=("plain", "html"))
    return body.get_content() if body is not None else None


def measure(fn: Callable[[], object], seconds: float) -> dict[str, float]:
    fn()  # warm up
    count = 0
    start = time.perf_counter()
    cpu = time.process_time()
    while True:
        for _ in range(20):
            fn()
        count += 20
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    cpu_used = time.process_time() - cpu
    return {
        "ops": count,
        "per_s": count / elapsed,
        "ms_per_op": 1000 * elapsed / count,
        "cpu_ms_per_op": 1000 * cpu_used / count,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="wall time per row (default 2)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)

    small = html_message()
    big = attachments_message()
    fwd = gmail_forward()
    fwd_parsed = parse_message(fwd)
    head = small[: small.index(b"\r\n\r\n") + 4]
    assert parse_message(small).snippet and len(parse_message(big).attachments) == 3

    rows: list[tuple[str, int, Callable[[], object]]] = [
        ("parse_message, 10 KB HTML", len(small), lambda: parse_message(small)),
        ("parse_message, 200 KB with attachments", len(big), lambda: parse_message(big)),
        ("parse_headers, IMAP header block", len(head), lambda: parse_headers(head)),
        ("unwrap_forward, Gmail HTML forward", len(fwd), lambda: unwrap_forward(fwd, fwd_parsed)),
        ("stdlib policy.default + get_body, 10 KB", len(small), lambda: stdlib_default(small)),
        ("stdlib policy.default + get_body, 200 KB", len(big), lambda: stdlib_default(big)),
    ]
    results: list[dict[str, Any]] = []
    for name, size, fn in rows:
        print(f"measuring {name} ...", file=sys.stderr)
        results.append({"name": name, "bytes": size, **measure(fn, args.seconds)})

    if args.json:
        meta = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
        print(json.dumps({**meta, "rows": results}, indent=2))
        return 0
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, one core, {args.seconds:g} s per row")
    print(f"{'':44} {'bytes':>8} {'msgs/s':>10} {'ms/msg':>8} {'cpu ms':>8}")
    for r in results:
        figures = f"{r['per_s']:>10.0f} {r['ms_per_op']:>8.3f} {r['cpu_ms_per_op']:>8.3f}"
        print(f"{r['name']:44} {r['bytes']:>8} {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
