"""Signature and disclaimer blocks: placement, separators, and "added once"."""

from __future__ import annotations

from gateway.pipeline.signature import Block, add_to_html, add_to_text, carries

SIG = Block("signature", html="<p>Alice Smith<br>AE, Example</p>", text="Alice Smith\nAE, Example")
DISC = Block("disclaimer", html="<small>Confidential.</small>", text="Confidential.")


def test_plain_text_signature_and_disclaimer() -> None:
    doc = "Hi Bob,\r\n\r\nsee you.\r\n"
    with_sig = add_to_text(doc, SIG, "\r\n")
    assert with_sig == "Hi Bob,\r\n\r\nsee you.\r\n-- \r\nAlice Smith\r\nAE, Example\r\n"
    assert with_sig is not None
    both = add_to_text(with_sig, DISC, "\r\n")
    assert both == with_sig + "\r\nConfidential.\r\n"
    # a part without a final line break keeps ending without one
    assert add_to_text("x", SIG, "\n") == "x\n-- \nAlice Smith\nAE, Example"


def test_html_goes_before_body_end_with_a_marker() -> None:
    doc = "<html><body><p>Hi</p></body></html>"
    out = add_to_html(doc, SIG, "\r\n")
    assert out == (f'<html><body><p>Hi</p><div data-mailgw-signature="{SIG.block_id}">'
                   "<p>Alice Smith<br>AE, Example</p></div></body></html>")
    assert out is not None and add_to_html(out, SIG, "\r\n") is None        # added once
    assert add_to_html(out, DISC, "\r\n") is not None                         # another block still goes in


def test_added_once_survives_a_client_rewriting_the_quote() -> None:
    # Gmail-style quote: markup changed, marker gone, entities differ, '>' quote markers in text
    quoted_html = ('<div>Thanks!</div><blockquote class="gmail_quote"><div>Alice&nbsp;Smith<br/>\n'
                   "<span>AE, Example</span></div></blockquote>")
    assert carries(quoted_html, True, SIG)
    assert add_to_html(quoted_html, SIG, "\n") is None
    quoted_text = "Thanks!\n\nOn Monday Alice wrote:\n> see you.\n> -- \n> Alice Smith\n> AE, Example\n"
    assert add_to_text(quoted_text, SIG, "\n") is None


def test_another_signature_does_not_count() -> None:
    other = Block("signature", html="<p>Carol Jones<br>CFO</p>")
    doc = f'<div data-mailgw-signature="{other.block_id}"><p>Carol Jones<br>CFO</p></div>'
    assert not carries(doc, True, SIG)
    assert add_to_html(doc, SIG, "\n") is not None


def test_variants_are_derived_and_line_breaks_follow_the_message() -> None:
    html_only = Block("signature", html="<p>A &amp; B<br>Line 2</p>")
    assert html_only.text_variant() == "A & B\nLine 2"
    text_only = Block("disclaimer", text="x < y\nz")
    assert text_only.html_variant() == "x &lt; y<br>z"
    out = add_to_html("<p>a</p>", Block("signature", html="<p>1</p>\n<p>2</p>"), "\r\n")
    assert out is not None and "<p>1</p>\r\n<p>2</p>" in out and "\n<p>2" in out
    assert Block("signature").empty and Block("signature", text="  \n").empty
