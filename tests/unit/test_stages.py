"""The stage runner: fixed order, transparency, per-recipient copies and grouping."""

from __future__ import annotations

import re

import pytest

from gateway.ids import new_queue_id
from gateway.pipeline.stages import STAGES, CopyContext, StageSettings, transform
from gateway.tracking.tokens import TokenSigner

SIGNER = TokenSigner([b"s" * 32])
BASE = "https://t.example.test"
HTML = (b"From: a@example.test\r\nTo: b@example.test, c@example.test\r\nSubject: s\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b'<html><body><p><a href="https://shop.example.test/x">x</a></p></body></html>\r\n')
TRACK = StageSettings(track_opens=True, track_clicks=True)


def ctx(settings: StageSettings, rcpt: str = "b@example.test") -> CopyContext:
    return CopyContext(rcpt, new_queue_id(), settings, BASE, SIGNER)


def test_order_is_fixed() -> None:
    assert [name for name, _ in STAGES] == ["signature", "disclaimer", "links", "pixel"]


def test_nothing_to_do_returns_the_input_object() -> None:
    assert transform(HTML, ctx(StageSettings())).data is HTML
    plain = HTML.replace(b"text/html", b"text/plain")
    out = transform(plain, ctx(TRACK))                     # tracking on, but nothing trackable
    assert out.data is plain and not out.changed and out.report.stages == []


def test_signature_links_pixel_in_order() -> None:
    s = StageSettings(track_opens=True, track_clicks=True, signature_html='<a href="https://me.test/">me</a>',
                      disclaimer_text="Confidential.")
    out = transform(HTML, ctx(s))
    text = out.data.decode()
    assert out.report.stages == ["signature", "disclaimer", "links", "pixel"]
    assert list(out.report.links.values()) == ["https://shop.example.test/x", "https://me.test/"]
    sig, disc, pixel = text.index("data-mailgw-signature"), text.index("Confidential."), text.index("/o/")
    assert sig < disc < pixel < text.index("</body>")
    assert text.startswith(HTML.split(b"\r\n\r\n")[0].decode())          # headers kept as written


def test_each_recipient_gets_its_own_tokens() -> None:
    a, b = ctx(TRACK, "b@example.test"), ctx(TRACK, "c@example.test")
    for c in (a, b):
        out = transform(HTML, c)
        toks = re.findall(re.escape(BASE) + r"/[co]/([\w.-]+)", out.data.decode())
        assert len(toks) == 3          # honeypot, link, pixel
        claims = [SIGNER.verify(t) for t in toks]
        assert {claim.copy_id for claim in claims if claim is not None} == {c.copy_id}
        assert None not in claims


def test_undecodable_body_part_is_skipped_and_reported() -> None:
    raw = HTML.replace(b"charset=utf-8", b"charset=x-nonsense")
    out = transform(raw, ctx(TRACK))
    assert out.data is raw
    assert out.report.skipped == ["message body: unknown charset 'x-nonsense'"]


@pytest.mark.parametrize("base", ["", "ftp://t.test", "https://t.test/a b", "https://t.test/?x", 'https://t"'])
def test_tracking_needs_a_sane_base_url(base: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        CopyContext("b@x.test", new_queue_id(), TRACK, base, SIGNER)


def test_tracking_needs_a_queue_id() -> None:
    with pytest.raises(ValueError, match="queue id"):
        CopyContext("b@x.test", "not-a-ulid", TRACK, BASE, SIGNER)


def test_tracking_needs_a_signer() -> None:
    with pytest.raises(ValueError, match="signer"):
        CopyContext("b@x.test", new_queue_id(), TRACK, BASE, None)
    CopyContext("b@x.test", new_queue_id(), StageSettings(signature_text="s"))   # fine without tracking


def test_base_url_with_path_and_trailing_slash() -> None:
    c = CopyContext("b@x.test", new_queue_id(), TRACK, "https://t.example.test/track/", SIGNER)
    out = transform(HTML, c).data.decode()
    assert "https://t.example.test/track/c/" in out and "https://t.example.test/track/o/" in out
    assert "track//" not in out


def test_two_html_body_parts_number_on_with_one_honeypot() -> None:
    # multipart/mixed [html, html]: both are the body (the leading inline text parts)
    raw = (b"From: a@example.test\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/html\r\n\r\n<body><a href=\"https://a.test/1\">1</a></body>\r\n--B\r\n"
           b"Content-Type: text/html\r\n\r\n<body><a href=\"https://a.test/2\">2</a></body>\r\n--B\r\n"
           b"Content-Type: image/png\r\nContent-Disposition: inline; filename=i.png\r\n\r\nPNG\r\n--B\r\n"
           b"Content-Type: text/html\r\n\r\n<body><a href=\"https://a.test/3\">3</a></body>\r\n--B--\r\n")
    out = transform(raw, ctx(TRACK))
    assert out.report.links == {1: "https://a.test/1", 2: "https://a.test/2"}   # not after the image
    assert out.report.honeypot and out.data.count(b"display:none !important") == 1
    assert out.report.pixels == 2 and b"\r\nPNG\r\n" in out.data
    assert out.data.endswith(b'<body><a href="https://a.test/3">3</a></body>\r\n--B--\r\n')
