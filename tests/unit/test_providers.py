"""Mailbox provider presets: the table, domains and MX names to providers, and what cannot work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.accounts.discover import discover
from gateway.config import PROVIDERS, PROVIDERS_SAVING_SENT, Account, load_config
from gateway.errors import ConfigError
from gateway.providers import (
    AUTH_METHODS,
    PRESETS,
    ProviderProblem,
    Server,
    by_domain,
    mail_domain,
    mx_provider,
    provider_problems,
)

# -- the table --------------------------------------------------------------------------------


def test_the_presets_that_existed_keep_their_servers() -> None:
    expected = {
        "gmail": (("imap.gmail.com", 993, "implicit"), ("smtp.gmail.com", 587, "starttls")),
        "microsoft365": (("outlook.office365.com", 993, "implicit"),
                         ("smtp.office365.com", 587, "starttls")),
        "outlook": (("outlook.office365.com", 993, "implicit"),
                    ("smtp-mail.outlook.com", 587, "starttls")),
        "yahoo": (("imap.mail.yahoo.com", 993, "implicit"), ("smtp.mail.yahoo.com", 465, "implicit")),
        "icloud": (("imap.mail.me.com", 993, "implicit"), ("smtp.mail.me.com", 587, "starttls")),
        "zoho": (("imap.zoho.com", 993, "implicit"), ("smtp.zoho.com", 465, "implicit")),
    }
    for name, (imap, smtp) in expected.items():
        p = PRESETS[name]
        assert p.imap is not None and p.smtp is not None
        assert (p.imap.host, p.imap.port, p.imap.tls) == imap, name
        assert (p.smtp.host, p.smtp.port, p.smtp.tls) == smtp, name
        cimap, csmtp = PROVIDERS[name]
        assert (cimap.host, cimap.port, cimap.tls) == imap
        assert (csmtp.host, csmtp.port, csmtp.tls) == smtp
    assert frozenset({"gmail", "microsoft365", "outlook", "yahoo"}) == PROVIDERS_SAVING_SENT


def test_every_provider_the_issue_names_has_a_preset() -> None:
    for name in ("gmail", "microsoft365", "outlook", "yahoo", "aol", "icloud", "zoho", "zoho-eu",
                 "zoho-in", "zoho-au", "zoho-jp", "zoho-ca", "zoho-sa", "zoho-cn", "fastmail",
                 "gmx", "gmx-de", "exchange", "imap"):
        assert PRESETS[name].name == name
    assert PRESETS["zoho-eu"].imap == Server("imap.zoho.eu", 993, "implicit")
    assert PRESETS["zoho-au"].smtp == Server("smtp.zoho.com.au", 465, "implicit")
    assert PRESETS["gmx"].imap != PRESETS["gmx-de"].imap
    # presets with fixed servers are in config.PROVIDERS; the two that need a host are not
    assert set(PROVIDERS) == set(PRESETS) - {"exchange", "imap"}
    assert PRESETS["exchange"].needs_imap_host and PRESETS["imap"].needs_imap_host


@pytest.mark.parametrize("p", list(PRESETS.values()), ids=list(PRESETS))
def test_each_preset_is_consistent(p: object) -> None:
    from gateway.providers import MailProvider
    assert isinstance(p, MailProvider)
    assert p.label and p.auth_methods <= set(AUTH_METHODS)
    for server in (p.imap, p.smtp):
        if server is not None:
            assert 0 < server.port < 65536 and server.tls in ("implicit", "starttls")
    for method in AUTH_METHODS:
        why = p.why_not(method)
        assert (why is None) == (method in p.auth_methods), (p.name, method)
    # a refusal is only ever given for a method the provider does not take
    assert not {m for m, _ in p.refusals} & p.auth_methods
    if p.oauth is not None:
        assert "oauth2" in p.auth_methods


def test_an_account_names_a_preset_or_gets_the_list(tmp_path: Path) -> None:
    ok = Account.model_validate({"id": "a", "email": "a@gmx.net", "provider": "gmx-de",
                                 "auth": {"password_file": "pw"}})
    imap = ok.imap_endpoint()
    assert imap is not None and imap.host == "imap.gmx.net"
    smtp = ok.smtp_endpoint()
    assert smtp is not None and (smtp.host, smtp.port) == ("mail.gmx.net", 587)
    exchange = Account.model_validate({"id": "e", "email": "e@corp.example", "provider": "exchange",
                                       "imap": {"host": "mail.corp.example", "port": 993},
                                       "auth": {"password_file": "pw"}})
    assert exchange.smtp_endpoint() is None and not exchange.saves_sent()
    p = tmp_path / "gateway.yaml"
    p.write_text("accounts:\n  - id: a\n    email: a@hotmail.com\n    provider: hotmail\n"
                 "    sync: {enabled: false}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    text = str(ei.value)
    assert f"{p}:4: accounts[0].provider: 'hotmail' is not a provider preset; use one of: gmail," in text
    assert "outlook" in text and "exchange" in text


# -- domains and exchangers --------------------------------------------------------------------


@pytest.mark.parametrize(("domain", "name"), [
    ("gmail.com", "gmail"), ("GoogleMail.com.", "gmail"), ("outlook.com", "outlook"),
    ("hotmail.com", "outlook"), ("live.com", "outlook"), ("msn.com", "outlook"),
    ("contoso.onmicrosoft.com", "microsoft365"), ("yahoo.com", "yahoo"), ("ymail.com", "yahoo"),
    ("yahoo.co.uk", "yahoo"), ("aol.com", "aol"), ("icloud.com", "icloud"), ("me.com", "icloud"),
    ("mac.com", "icloud"), ("zoho.com", "zoho"), ("zohomail.com", "zoho"), ("zoho.eu", "zoho-eu"),
    ("zohomail.in", "zoho-in"), ("zoho.com.au", "zoho-au"), ("fastmail.com", "fastmail"),
    ("fastmail.fm", "fastmail"), ("gmx.com", "gmx"), ("gmx.co.uk", "gmx"), ("gmx.net", "gmx-de"),
    ("gmx.de", "gmx-de"), ("gmx.at", "gmx-de"), ("gmx.info", "gmx"),
    ("yahoo.co.jp", None),          # Yahoo Japan: another company, other servers
    ("example.com", None), ("mail.gmail.com", None), ("notgmail.com", None), ("onmicrosoft.com", None),
    ("gmx.a.b.c", None), ("", None), (".", None), ("@", None),
])
def test_by_domain(domain: str, name: str | None) -> None:
    p = by_domain(domain)
    assert (p.name if p else None) == name


@pytest.mark.parametrize(("host", "name"), [
    ("aspmx.l.google.com", "gmail"), ("alt1.aspmx.l.google.com.", "gmail"), ("smtp.google.com", "gmail"),
    ("aspmx2.googlemail.com", "gmail"),
    ("contoso-com.mail.protection.outlook.com", "microsoft365"),
    ("contoso-com.a-v1.mx.microsoft", "microsoft365"),
    ("hotmail-com.olc.protection.outlook.com", "outlook"),
    ("mta5.am0.yahoodns.net", "yahoo"), ("mx-aol.mail.gm0.yahoodns.net", "aol"),
    ("mx01.mail.icloud.com", "icloud"), ("mx.zoho.com", "zoho"), ("mx2.zoho.com", "zoho"),
    ("mx.zoho.eu", "zoho-eu"), ("mx.zoho.com.au", "zoho-au"), ("mx.zohocloud.ca", "zoho-ca"),
    ("in1-smtp.messagingengine.com", "fastmail"), ("mx00.emig.gmx.net", "gmx-de"),
    ("evilgoogle.com", None), ("google.com.evil.example", None), ("mx.example.com", None),
    ("outlook.com", None), ("", None), (".", None),
])
def test_mx_provider(host: str, name: str | None) -> None:
    p = mx_provider(host)
    assert (p.name if p else None) == name


def test_custom_domains_at_zoho_use_the_organisation_servers() -> None:
    p = mx_provider("mx.zoho.in")
    assert p is not None and p.mx_servers == (Server("imappro.zoho.in", 993, "implicit"),
                                                Server("smtppro.zoho.in", 465, "implicit"))


@pytest.mark.parametrize(("address", "domain"), [
    ("alice@example.com", "example.com"), (" Alice@Example.COM. ", "example.com"),
    ('"odd@local"@example.org', "example.org"), ("bob@bücher.example", "xn--bcher-kva.example"),
])
def test_mail_domain(address: str, domain: str) -> None:
    assert mail_domain(address) == domain


@pytest.mark.parametrize("address", [
    "", "alice", "@example.com", "alice@", "alice@localhost", "alice@-bad.example",
    "alice@bad-.example", "alice@a..example", "alice@exa mple.com", "alice@[127.0.0.1]",
    "alice@1.2.3.4", "alice@" + "a" * 64 + ".example", "alice@" + ("a" * 60 + ".") * 5 + "example",
    "alice@under_score.example",
])
def test_mail_domain_refuses_what_is_no_mail_domain(address: str) -> None:
    with pytest.raises(ValueError, match="not"):
        mail_domain(address)


@given(st.text())
def test_by_domain_and_mx_provider_take_any_text(text: str) -> None:
    p, q = by_domain(text), mx_provider(text)
    assert p is None or p.name in PRESETS
    assert q is None or q.name in PRESETS


@given(st.one_of(st.text(), st.emails(), st.from_regex(r"[a-z]{1,5}@[a-z0-9.-]{0,20}", fullmatch=True)))
def test_mail_domain_answers_a_dns_name_or_value_error(text: str) -> None:
    try:
        domain = mail_domain(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert domain.isascii() and domain == domain.lower() and len(domain) <= 253
    assert "." in domain and not domain.endswith(".")


@given(st.one_of(st.text(), st.sampled_from(["a@gmail.com", "x@ZOHO.eu", "b@gmx.net", "c@ymail.com"])))
def test_discover_needs_no_dns_for_garbage_or_a_preset_domain(text: str) -> None:
    """Garbage is a ValueError and a preset domain answers from the table: neither asks DNS
    (the nameserver given is a port nothing answers on, with a tiny timeout)."""
    try:
        domain = mail_domain(text)
    except ValueError:
        with pytest.raises(ValueError):
            asyncio.run(discover(text, nameservers=[("127.0.0.1", 9)], timeout=0.01))
        return
    if by_domain(domain) is None:
        return
    found = asyncio.run(discover(text, nameservers=[("127.0.0.1", 9)], timeout=0.01))
    assert found.how == "preset" and found.provider == by_domain(domain).name  # type: ignore[union-attr]


# -- what cannot work --------------------------------------------------------------------------


def problems(provider: str, method: str, **kw: bool | str | None) -> list[ProviderProblem]:
    kw.setdefault("has_imap_host", False)
    kw.setdefault("has_smtp_host", False)
    return provider_problems(provider, method, **kw)  # type: ignore[arg-type]


def test_basic_authentication_at_microsoft_is_refused() -> None:
    for provider in ("microsoft365", "outlook"):
        [p] = problems(provider, "password")
        assert p.key == "auth.method" and p.severity == "error"
        assert "Microsoft turned off basic authentication" in p.message and "oauth2" in p.message
    [p] = problems("microsoft365", "delegate")
    assert "basic authentication" in p.message and "service" in p.message
    [p] = problems("outlook", "service")
    assert "oauth2" in p.message
    assert problems("microsoft365", "oauth2") == [] and problems("microsoft365", "service") == []


def test_gmail_has_no_sasl_delegate() -> None:
    [p] = problems("gmail", "delegate")
    assert p.key == "auth.method" and "Gmail has no SASL delegate" in p.message
    assert "service" in p.message
    for method in ("password", "oauth2", "service"):
        assert problems("gmail", method) == []


def test_servers_a_provider_lacks_must_be_given() -> None:
    [p] = problems("imap", "password")
    assert p == ProviderProblem("provider", "provider: imap needs an imap: {host, port} section")
    [p] = problems("exchange", "delegate")
    assert p.message == "provider: exchange needs an imap: {host, port} section"
    assert problems("exchange", "delegate", has_imap_host=True) == []
    # sending through the account needs an SMTP server: a preset's, or the account's own
    [p] = problems("exchange", "password", has_imap_host=True, sends=True)
    assert p.key == "smtp" and "smtp: {host, port}" in p.message
    assert problems("exchange", "password", has_imap_host=True, has_smtp_host=True, sends=True) == []
    assert problems("gmail", "password", sends=True) == []


def test_other_combinations() -> None:
    [p] = problems("icloud", "oauth2")
    assert "app-specific password" in p.message
    [p] = problems("yahoo", "service")
    assert "no service accounts" in p.message
    [p] = problems("yahoo", "oauth2", has_token_endpoint=False)
    assert "auth.token_endpoint" in p.message
    assert problems("yahoo", "oauth2", has_token_endpoint=True) == []
    assert problems("yahoo", "oauth2") == []          # None: the caller checks endpoints itself
    [p] = problems("exchange", "oauth2", has_imap_host=True)
    assert p.severity == "warning"
    [p] = problems("gmail", "service", service_kind="microsoft")
    assert p.key == "auth.service_account" and "google" in p.message
    assert problems("gmail", "service", service_kind="google") == []
    [p] = problems("hotmail", "password")
    assert p.key == "provider" and "use one of: gmail" in p.message
    assert problems("gmail", "no-such-method") == []  # the auth model refuses those itself


def test_every_preset_needing_an_app_password_says_what_to_do() -> None:
    for name in ("yahoo", "aol", "icloud", "fastmail", "gmx", "gmx-de", "zoho-eu"):
        note = PRESETS[name].app_password_note
        assert note is not None and "password" in note
