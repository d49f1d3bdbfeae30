"""The HTML tokenizer: what counts as a tag, and the exact positions of attribute values."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.htmltok import body_start, insertion_point, tokenize
from tests.support import htmltok_reference as reference


def hrefs(doc: str) -> list[str]:
    out = []
    for t in tokenize(doc):
        a = t.get("href")
        if not t.is_end and t.name in ("a", "area") and a is not None:
            out.append(doc[a.value_start:a.value_end])
    return out


def test_quoting_styles_and_case() -> None:
    doc = """<A HREF="d q">x</A><a href='s q'><a class=c href=un/quoted?a=b>
    <a\thref\n=\n"spaced"><a href=>"""
    assert hrefs(doc) == ["d q", "s q", "un/quoted?a=b", "spaced", ""]
    tags = tokenize(doc)
    assert tags[0].name == "a" and tags[1].name == "a" and tags[1].is_end


def test_value_positions_are_exact() -> None:
    doc = 'x<a title="a>b" href="H1" href="H2">'
    (tag,) = tokenize(doc)
    a = tag.get("href")
    assert a is not None and (doc[a.value_start:a.value_end], a.quote) == ("H1", '"')  # first one wins
    assert doc[tag.start:tag.end] == doc[1:]


def test_comments_doctype_cdata_and_processing_instructions_hide_tags() -> None:
    doc = ("<!DOCTYPE html><!-- <a href=c1> --><!--><a href=ok1><!---><a href=ok2>"
           "<!-- x --!><a href=ok3><![CDATA[ <a href=cd> ]]><?php <a href=pi ?><a href=ok4>")
    assert hrefs(doc) == ["ok1", "ok2", "ok3", "ok4"]


def test_raw_text_elements_hide_tags() -> None:
    doc = ("<script>'<a href=s1>'</script ><style>/*<a href=s2>*/</STYLE><title><a href=t></title>"
           "<textarea><a href=ta></textarea><a href=ok><noscript><a href=ns></noscript>")
    assert hrefs(doc) == ["ok", "ns"]
    assert hrefs("<script><a href=x>") == []            # unterminated script swallows the rest
    assert hrefs("<plaintext><a href=x>") == []


def test_outlook_conditional_comments_are_tokenized() -> None:
    doc = ('<!--[if mso]><a href="mso">o</a><![endif]-->'
           '<!--[if !mso]><!--><a href="notmso">n</a><!--<![endif]-->'
           '<!--[if gte mso 9]><xml><a href="x9"></xml><![endif]-->')
    assert hrefs(doc) == ["mso", "notmso", "x9"]


def test_cut_off_tags_are_not_tags() -> None:
    assert hrefs('<a href="never closed>text') == []
    assert hrefs("<a href=x") == []
    assert hrefs("a < b <3 <a href=y>") == ["y"]
    assert hrefs("</ a href=z><a href=w>") == ["w"]         # "</ " starts a bogus comment


def test_insertion_point_and_body_start() -> None:
    doc = "<html><body x=1><!-- </body> --><p>a</p></BODY >\n</html>\n"
    assert doc[insertion_point(doc):].startswith("</BODY >")
    assert doc[: body_start(tokenize(doc)) or 0].endswith("<body x=1>")
    assert insertion_point("<p>x</p>\r\n\r\n") == len("<p>x</p>")
    assert "<p>x</p></html>"[insertion_point("<p>x</p></html>"):] == "</html>"
    assert body_start(tokenize("<p>no body</p>")) is None


FRAGMENTS = ["<", ">", "</", "/", "=", '"', "'", " ", "\t", "\n", "a", "A", "href", "HREF", "x", "1", "-",
             "!", "?", "<!--", "-->", "--!>", "<!-->", "<![CDATA[", "]]>", "<!--[if mso]>", "<![endif]-->",
             "<a ", "<area ", "</a>", "<body>", "</body>", "<script>", "</script>", "<style>", "</style >",
             "<title>", "</title>", "<plaintext>", "<textarea>", "</textarea>", "<p", "&amp;", "é",
             "data-notrack",
             "<html>", "</html>", "</BODY>", "<\u017fcript>", "</\u017fcript>", "<SCRIPT ", "<![", "\u212a",
             "<!DOCTYPE html>"]


@settings(max_examples=int(os.environ.get("MAILGW_HYPOTHESIS_EXAMPLES", "300")) * 2, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_same_tags_as_the_reference_state_machine(doc: str) -> None:
    def shape(tags: list[Any]) -> list[tuple[object, ...]]:
        return [(t.name, t.start, t.end, t.is_end,
                 tuple((a.name, a.value_start, a.value_end, a.quote) for a in t.attrs)) for t in tags]

    assert shape(tokenize(doc)) == shape(reference.tokenize(doc))
    sets = (frozenset({"a", "area", "body"}), frozenset({"body", "html"}), frozenset({"script", "a"}))
    for wanted in sets:
        assert shape(tokenize(doc, wanted)) == [t for t in shape(reference.tokenize(doc)) if t[0] in wanted]
