"""Link rewriting: which hrefs change, to what, and that nothing else does."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.pipeline.htmltok import insertion_point
from gateway.pipeline.links import (
    LinkPolicy,
    clean_url,
    honeypot_markup,
    list_unsubscribe_urls,
    rewrite_links,
    unescape_attr,
)
from gateway.pipeline.pixel import insert_pixel
from gateway.tracking.tokens import TokenSigner

SIGNER = TokenSigner([b"l" * 32])
COPY = "01JNKZ6W3Q9R8S7T6V5X4Y3Z2A"
BASE = "https://t.example.test"


def policy(**kw: Any) -> LinkPolicy:
    args: dict[str, Any] = {"base_url": BASE, "copy_id": COPY, "signer": SIGNER}
    args.update(kw)
    return LinkPolicy(**args)


@pytest.mark.parametrize(("raw", "meant"), [
    ("a?x=1&amp;y=2", "a?x=1&y=2"),
    ("a?x=1&#38;y=2&#x26;z=3&#X26;w", "a?x=1&y=2&z=3&w"),
    ("a?x=1&copy=2", "a?x=1&copy=2"),           # legacy entity before '=' stays literal
    ("a?x=1&copyz", "a?x=1&copyz"),             # ... and before an alphanumeric
    ("a?&copy;", "a?\u00a9"),
    ("a?&copy", "a?\u00a9"),                    # at the end it is a reference
    ("a?&notanentity;", "a?&notanentity;"),
    ("&#0;&#x110000;&#128;", "\ufffd\ufffd\u20ac"),  # HTML5 numeric rules
])
def test_unescape_attr_follows_the_attribute_rules(raw: str, meant: str) -> None:
    assert unescape_attr(raw) == meant


def test_clean_url_strips_what_browsers_strip() -> None:
    assert clean_url(" \n https://a.test/p\tq\r\n?x=1&amp;y \x01") == "https://a.test/pq?x=1&y"


def test_list_unsubscribe_urls() -> None:
    got = list_unsubscribe_urls(["<mailto:u@x.test?subject=unsub>, <https://x.test/u?a=1&b=2>"])
    assert got == frozenset({"mailto:u@x.test?subject=unsub", "https://x.test/u?a=1&b=2"})


def test_only_trackable_links_change_and_nothing_else() -> None:
    doc = ('<p><a href="https://a.test/1?x=1&amp;y=2">1</a> <a href="mailto:m@a.test">m</a>'
           '<a href="tel:+1">t</a><a href="sms:+1">s</a><a href="#top">#</a>'
           '<a href="javascript:alert(1)">j</a><a href="/rel">r</a><a href="//proto.test/rel">pr</a>'
           '<a href="https:no-host">nh</a><a href="ftp://f.test/">f</a>'
           '<a data-notrack href="https://a.test/private">n</a>'
           '<a href="https://T.EXAMPLE.TEST/c/old.token">tracked</a>'
           '<a href="https://a.test/unsub?u=1&amp;l=2">u</a>'
           '<a href="https://www.skip.test/x">g</a><a href="http://B.test/SKIPME">g2</a>'
           '<area href=HTTP://a.test/area><link href="https://a.test/css"></p>')
    pol = policy(skip_links=("*.skip.test/*", "b.test/skip*"), unsubscribe=frozenset({"https://a.test/unsub?u=1&l=2"}),
                 honeypot=False)
    out = rewrite_links(doc, pol)
    assert out.links == {1: "https://a.test/1?x=1&y=2", 2: "HTTP://a.test/area"}
    assert "https://T.EXAMPLE.TEST/c/old.token" in out.text      # already tracked: kept
    new = re.findall(re.escape(BASE) + r"/c/([\w.-]+)", out.text)
    assert len(new) == 2
    for tok, (n, url) in zip(new, out.links.items(), strict=True):
        data = SIGNER.verify(tok)
        assert data is not None and (data.kind, data.copy_id, data.link, data.url) == ("click", COPY, n, url)
    # put the original values back: the document is unchanged otherwise
    restored = out.text.replace(f"{BASE}/c/{new[0]}", "https://a.test/1?x=1&amp;y=2", 1)
    restored = restored.replace(f"{BASE}/c/{new[1]}", "HTTP://a.test/area", 1)
    assert restored == doc


def test_numbering_continues_and_honeypot_placement() -> None:
    doc = '<html><body class="x"><a href="https://a.test/1">1</a><a href="https://a.test/2">2</a></body></html>'
    out = rewrite_links(doc, policy(first_link=5))
    assert list(out.links) == [5, 6] and out.honeypot
    assert re.search(r'<body class="x"><a href="https://t\.example\.test/c/[\w.-]+" style="display:none '
                     r'!important" aria-hidden="true" tabindex="-1"></a><a href', out.text)
    hp = re.search(r'<a href="https://t\.example\.test/c/([\w.-]+)" style="display:none', out.text)
    assert hp is not None
    data = SIGNER.verify(hp.group(1))
    assert data is not None and (data.kind, data.link, data.url) == ("honeypot", 0, "https://a.test/1")
    # without <body>: right before the first rewritten link
    frag = rewrite_links('<p>x <a href="mailto:a@b">m</a> <A HREF=https://a.test/>y</A></p>', policy())
    assert frag.text.startswith('<p>x <a href="mailto:a@b">m</a> <a href=')
    assert "></a><A HREF=https://t.example.test/c/" in frag.text


def test_no_trackable_link_means_no_change_and_no_honeypot() -> None:
    doc = '<body><a href="mailto:x@y.test">m</a></body>'
    out = rewrite_links(doc, policy())
    assert out.text is doc and out.links == {} and not out.honeypot


def test_honeypot_has_nothing_to_see_or_hear() -> None:
    m = honeypot_markup("https://t.test/c/x.y")
    assert m.endswith("></a>") and 'aria-hidden="true"' in m
    assert 'tabindex="-1"' in m and "display:none" in m


def test_rewritten_value_is_safe_in_every_quoting() -> None:
    out = rewrite_links("<a href=https://a.test/x>x</a><a href='https://a.test/y'>y</a>",
                        policy(honeypot=False))
    assert re.fullmatch(r"<a href=https://t\.example\.test/c/[\w.-]+>x</a><a href='https://t\.example\.test/c/"
                        r"[\w.-]+'>y</a>", out.text)


# -- the pixel's place, known from the links stage's own tokenizing ------------------------

_DOC_ATOMS = st.sampled_from([
    "text ", "<p>", "</p>", '<a href="https://x.example.test/a?b=1&amp;c=2">x</a>',
    "<a href=https://u.example.test/unquoted>u</a>", "<A HREF='https://y.example.test/'>y</A>",
    '<area href="https://z.example.test/">', '<a href="mailto:m@example.test">m</a>',
    "<body>", '<body class="x">', "</body>", "</BODY >", "<html>", "</html>", "</HTML>",
    "<!-- </body> -->", "<!--", "-->", "<script></body></script>", "<script>",
    "<style>a{}</style>", "<title></body></title>", "<textarea></body></textarea>",
    "<![CDATA[ </body> ]]>", "<?pi </body>?>", "< /body>", "</body", "\n", "  ", "\t"])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_DOC_ATOMS, max_size=30).map("".join), st.booleans())
def test_insertion_point_of_the_rewritten_text_is_the_pixel_place(doc: str, honeypot: bool) -> None:
    """A wrong offset would put the pixel somewhere else than `insert_pixel` alone does."""
    out = rewrite_links(doc, policy(honeypot=honeypot))
    if not out.links:
        assert out.insertion_point is None
        return
    assert out.insertion_point == insertion_point(out.text)
    url = f"{BASE}/o/tok"
    assert insert_pixel(out.text, url, out.insertion_point) == insert_pixel(out.text, url)
