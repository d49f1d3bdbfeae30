"""Policy match predicates: globs, every match key, any-of / all-of, `not`, headers."""

from __future__ import annotations

import pytest

from gateway.policy.rules import Context, GlobSet, Headers, Matcher, unfold


def ctx(sender: str = "rep@sales.example.test", recipient: str = "bob@customer.example.org",
        user: str | None = "rep@sales.example.test", account: str | None = "rep",
        headers: Headers | None = None) -> Context:
    return Context.make(sender, recipient, user, account, headers)


@pytest.mark.parametrize(("patterns", "value", "expected"), [
    (["*@example.test"], "Alice@EXAMPLE.test", True),          # case-insensitive
    (["alice@example.test"], "ALICE@example.test", True),      # literal, case-insensitive
    (["alice@example.test"], "alice@example.test.evil", False),  # whole value, not a prefix
    (["*@example.test"], "a@sub.example.test", False),
    (["*example.test"], "a@sub.example.test", True),           # * crosses @ and .
    (["rep?@x.test"], "rep1@x.test", True),
    (["rep?@x.test"], "rep12@x.test", False),
    (["rep[0-4]@x.test"], "rep3@x.test", True),
    (["rep[!0-4]@x.test"], "rep3@x.test", False),
    (["a@x.test", "*@y.test"], "b@y.test", True),              # a list is any-of
    (["a@x.test", "*@y.test"], "b@z.test", False),
    (["*"], "", True),                                          # the null sender
    (["a.b@x.test"], "aXb@x.test", False),                      # . is literal, not regex
])
def test_globset(patterns: list[str], value: str, expected: bool) -> None:
    assert GlobSet(patterns)(value) is expected


def test_sender_and_recipient() -> None:
    m = Matcher({"sender": ["*@sales.example.test"]})
    assert m(ctx())
    assert not m(ctx(sender="ceo@example.test"))
    r = Matcher({"recipient": ["BOB@customer.example.org"]})
    assert r(ctx())
    assert not r(ctx(recipient="eve@customer.example.org"))
    assert r(ctx(recipient="<Bob@Customer.Example.org>"))


def test_domains_exact_and_subdomains() -> None:
    exact = Matcher({"recipient_domain": ["example.org"]})
    assert exact(ctx(recipient="a@example.org"))
    assert not exact(ctx(recipient="a@customer.example.org"))
    sub = Matcher({"recipient_domain": ["*.example.org"]})
    assert sub(ctx(recipient="a@customer.example.org"))
    assert sub(ctx(recipient="a@x.y.example.org"))
    assert not sub(ctx(recipient="a@example.org"))          # only subdomains
    assert not sub(ctx(recipient="a@badexample.org"))
    s = Matcher({"sender_domain": ["sales.example.test"]})
    assert s(ctx())
    assert not s(ctx(sender="a@example.test"))
    assert not s(ctx(sender=""))                             # null sender: no domain


def test_user_and_account() -> None:
    u = Matcher({"user": ["rep@*"]})
    assert u(ctx())
    assert not u(ctx(user=None))                  # a trusted network has no user
    a = Matcher({"account": ["rep", "other"]})
    assert a(ctx())
    assert not a(ctx(account="someone"))
    assert not a(ctx(account=None))


def test_all_of_and_empty() -> None:
    both = Matcher({"sender_domain": ["sales.example.test"], "recipient": ["bob@*"]})
    assert both(ctx())
    assert not both(ctx(recipient="eve@customer.example.org"))
    assert not both(ctx(sender="bob@other.test"))
    everything = Matcher()
    assert everything.matches_everything and everything(ctx(sender="", user=None))


def test_header_values_and_presence() -> None:
    h = Headers.from_bytes(b"Subject: Spring =?utf-8?q?sal=C3=A9?=\r\n"
                           b"X-Campaign: spring-\r\n 2026\r\n"
                           b"x-campaign: second\r\n")
    assert h.get_all("x-campaign") == ["spring- 2026", "second"]  # unfolded (WSP kept), both
    assert h.get_all("SUBJECT") == ["Spring salé"]                # RFC 2047 decoded
    m = Matcher(headers=[("X-Campaign", "SPRING-*")])
    assert m(ctx(headers=h))
    assert Matcher(headers=[("X-Campaign", "second")])(ctx(headers=h))   # any field of the name
    assert not Matcher(headers=[("X-Campaign", "autumn-*")])(ctx(headers=h))
    assert Matcher(headers=[("x-campaign", "*")])(ctx(headers=h))        # presence
    assert not Matcher(headers=[("X-Other", "*")])(ctx(headers=h))
    assert Matcher(headers=[("Subject", "*salé")])(ctx(headers=h))
    # a list of header items is any-of
    assert Matcher(headers=[("X-Other", "*"), ("Subject", "spring*")])(ctx(headers=h))
    # before DATA no headers are known: a header match is false
    assert not m(ctx(headers=None))
    assert m.uses_headers


def test_not() -> None:
    m = Matcher({"sender_domain": ["sales.example.test"]},
                negated=Matcher({"recipient": ["bob@*", "carol@*"]}))
    assert not m(ctx())
    assert not m(ctx(recipient="carol@x.test"))
    assert m(ctx(recipient="dave@x.test"))
    hm = Matcher(negated=Matcher(headers=[("X-No-Track", "yes")]))
    assert hm.uses_headers
    assert hm(ctx(headers=Headers.from_pairs([("X-No-Track", "no")])))
    assert not hm(ctx(headers=Headers.from_pairs([("x-no-track", "YES")])))


def test_unfold() -> None:
    assert unfold(" a\r\n\tb \r\n c ") == "a\tb  c"
    assert unfold("=?bogus?x?y?=") == "=?bogus?x?y?="   # undecodable stays as written


def test_unknown_key() -> None:
    with pytest.raises(ValueError):
        Matcher({"subject": ["x"]})
