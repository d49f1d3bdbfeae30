"""Policy loading and decisions: order and override across files, provenance, defaults,
templates, and every validation error with its file:line: key text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Company, User, load_config
from gateway.errors import ConfigError
from gateway.keys.dkim import generate, private_pem
from gateway.policy import Headers, PolicySet, load_policies, policies_for, render_template
from gateway.policy.templates import html_to_text

ROOT = Path(__file__).resolve().parents[2]
HASH = "$argon2id$v=19$m=65536,t=3,p=4$kumKlkCTqYtNQ2fFQqJ3oA$T7n9YXOz6qMoKUjDgNgw15ZhvCBQzCxNsuxICupOA44"

DKIM_PEM = private_pem(generate("rsa-sha256", 1024))

CONFIG = f"""hostname: gw.example.test
company: {{name: "Example & Co"}}
users:
  - {{login: rep@sales.example.test, password_hash: "{HASH}", name: Rep <One>, title: AE,
     phone: "+1 555", account: rep}}
  - {{login: alice@example.test, password_hash: "{HASH}", name: Alice}}
accounts:
  - {{id: rep, email: rep@sales.example.test, provider: gmail, sync: {{enabled: false}}}}
delivery:
  route: smarthost
  smarthost: {{host: 127.0.0.1, port: 2500, tls: none}}
tracking: {{opens: true, clicks: false}}
dkim:
  example.test: {{selector: s1, key_file: dkim.pem}}
"""


def setup(tmp_path: Path, files: dict[str, str], config: str = CONFIG,
          explicit_dir: bool = True) -> Path:
    """Write gateway.yaml and policies/<files>; return the config path."""
    (tmp_path / "dkim.pem").write_bytes(DKIM_PEM)
    pol = tmp_path / "policies"
    pol.mkdir(exist_ok=True)
    for name, text in files.items():
        p = pol / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config + ("policies_dir: policies\n" if explicit_dir else ""))
    return cfg


def load(tmp_path: Path, files: dict[str, str], **kw: Any) -> PolicySet:
    return policies_for(load_config(setup(tmp_path, files, **kw)))


def problems(tmp_path: Path, files: dict[str, str], **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, files, **kw)
    return [str(p) for p in ei.value.problems]


# ----------------------------------------------------------------------------------
# decisions


def test_defaults_come_from_the_config(tmp_path: Path) -> None:
    ps = load(tmp_path, {})
    d = ps.decide("alice@example.test", "bob@customer.example.org")
    s = d.settings
    assert (s.track_opens, s.track_clicks, s.skip_links, s.signature, s.disclaimer, s.route,
            s.max_per_day, s.store) == (True, False, (), None, None, "smarthost", None, True)
    assert s.dkim is True                        # dkim: has a key for example.test
    assert str(d.source("track_opens")) == "default (config tracking.opens)"
    assert str(d.source("dkim")) == "default (config dkim: has a key for the sender's domain)"
    assert d.matched == ()
    other = ps.decide("x@other.example.org", "bob@customer.example.org").settings
    assert other.dkim is False                   # no key for that domain
    assert str(ps.decide("y@example.test", "b@x.org").source("dkim")) == (
        "default (config dkim: has a key for the sender's domain)")   # cached, still right


def test_dkim_default_covers_subdomains_as_the_signer_does(tmp_path: Path) -> None:
    """The signer signs mail from sales.example.test with example.test's key, so `dkim` is on
    by default for it too; a domain that merely ends in the same letters is not covered."""
    ps = load(tmp_path, {})
    assert ps.decide("rep@sales.example.test", "b@x.org").settings.dkim is True
    assert ps.decide("rep@a.b.example.test.", "b@x.org").settings.dkim is True
    assert ps.decide("x@notexample.test", "b@x.org").settings.dkim is False


def test_later_rules_override_key_by_key_across_files(tmp_path: Path) -> None:
    ps = load(tmp_path, {
        "20-b.yaml": """
- name: cap for sales
  match: {sender_domain: [sales.example.test]}
  set: {max_per_day: 50, track_opens: true}
""",
        "10-a.yaml": """
- name: all
  set: {max_per_day: 500, track_opens: false, route: mx}
- name: internal
  match: {recipient_domain: [example.test, "*.example.test"]}
  set: {track_opens: false, store: false}
""",
        "README.md": "not a policy",
        ".hidden.yaml": "- not: [valid",       # skipped: starts with a dot
    })
    assert [f.name for f in ps.files] == ["10-a.yaml", "20-b.yaml"]
    d = ps.decide("rep@sales.example.test", "x@example.test", "rep@sales.example.test", "rep")
    assert [m.rule for m in d.matched] == ["all", "internal", "cap for sales"]
    s = d.settings
    assert (s.max_per_day, s.track_opens, s.route, s.store) == (50, True, "mx", False)
    assert d.source("max_per_day").rule == "cap for sales"
    assert d.source("max_per_day").file == str(tmp_path / "policies" / "20-b.yaml")
    assert d.source("max_per_day").line == 2
    assert d.source("route").rule == "all"
    assert (d.source("store").rule, d.source("store").line) == ("internal", 4)
    assert str(d.source("store")) == f"rule 'internal' ({tmp_path}/policies/10-a.yaml:4)"
    assert d.source("track_clicks").rule is None           # nobody set it
    # a sender the later rule does not match keeps the earlier values
    d2 = ps.decide("alice@example.test", "x@example.org", "alice@example.test")
    assert (d2.settings.max_per_day, d2.settings.track_opens) == (500, False)


def test_null_resets_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "policies" / "t").mkdir(parents=True)
    (tmp_path / "policies" / "t" / "sig.txt").write_text("-- \n{user.name}\n")
    ps = load(tmp_path, {"p.yaml": """
- name: with signature
  set: {signature: t/sig.txt, track_opens: false, max_per_day: 5, dkim: false}
- name: reset
  match: {recipient: ["*@lawyer.example.org"]}
  set: {signature: null, track_opens: null, max_per_day: null, dkim: null}
"""})
    on = ps.decide("alice@example.test", "a@example.org").settings
    assert on.signature is not None and (on.track_opens, on.max_per_day, on.dkim) == (False, 5, False)
    d = ps.decide("alice@example.test", "a@lawyer.example.org")
    assert (d.settings.signature, d.settings.track_opens, d.settings.max_per_day,
            d.settings.dkim) == (None, True, None, True)
    assert d.source("track_opens").rule == "reset"


def test_skip_links_replace_and_add(tmp_path: Path) -> None:
    ps = load(tmp_path, {"p.yaml": """
- name: base
  set: {skip_links: ["https://a.example.test/*"]}
- name: replace
  match: {recipient_domain: [r.example.org]}
  set: {skip_links: "https://b.example.test/*"}
- name: add
  match: {recipient_domain: [r.example.org, x.example.org]}
  set: {skip_links_add: ["https://c.example.test/*"]}
"""})
    x = ps.decide("a@example.test", "u@x.example.org")
    assert x.settings.skip_links == ("https://a.example.test/*", "https://c.example.test/*")
    assert [s.rule for s in x.sources["skip_links"]] == ["base", "add"]
    assert x.settings.skip_link("HTTPS://c.example.test/unsubscribe?id=1")
    assert not x.settings.skip_link("https://b.example.test/x")
    r = ps.decide("a@example.test", "u@r.example.org")
    assert r.settings.skip_links == ("https://b.example.test/*", "https://c.example.test/*")
    assert r.settings.skip_link("https://b.example.test/x")
    assert not r.settings.skip_link("https://a.example.test/x")


def test_skip_link_is_the_link_stage_rule(tmp_path: Path) -> None:
    """`Settings.skip_link` answers as the link stage skips: a glob without a scheme also
    matches the URL without its `scheme://`."""
    from gateway.pipeline.links import LinkPolicy, rewrite_links
    from gateway.tracking.tokens import TokenSigner

    ps = load(tmp_path, {"p.yaml": """
- name: skip
  set: {skip_links: ["example.org/unsub*", "*.cdn.example.test/*"]}
"""})
    s = ps.decide("a@example.test", "u@x.example.org").settings
    urls = ["https://example.org/unsubscribe?u=1", "http://img.cdn.example.test/a.png",
            "https://example.org/offer", "https://example.org.evil.test/unsub"]
    policy = LinkPolicy(base_url="https://t.example.test", copy_id="01JNKZ6W3Q9R8S7T6V5X4Y3Z2A",
                        signer=TokenSigner([b"k" * 32]), skip_links=s.skip_links, honeypot=False)
    for url in urls:
        rewritten = bool(rewrite_links(f'<a href="{url}">x</a>', policy).links)
        assert s.skip_link(url) is not rewritten, url
    assert [s.skip_link(u) for u in urls] == [True, True, False, False]


def test_header_rules_and_json(tmp_path: Path) -> None:
    ps = load(tmp_path, {"p.yaml": """
- name: opt out
  match:
    header: [{name: X-Mailgw-No-Track, value: "yes"}, {name: Subject, value: "*[confidential]*"}]
  set: {track_opens: false}
"""})
    assert ps.uses_headers
    assert ps.decide("a@example.test", "b@example.org").settings.track_opens      # before DATA
    d = ps.decide("a@example.test", "b@example.org",
                  headers=[("Subject", "Offer [Confidential] v2")])
    assert not d.settings.track_opens
    h = Headers.from_bytes(b"X-MAILGW-NO-TRACK: Yes\r\n")
    assert not ps.decide("a@example.test", "b@example.org", headers=h).settings.track_opens
    out = json.loads(json.dumps(d.to_json()))
    assert out["settings"]["track_opens"] is False
    assert out["sources"]["track_opens"] == [{"rule": "opt out",
                                              "file": str(tmp_path / "policies/p.yaml"),
                                              "line": 2}]
    assert out["sources"]["route"] == [{"default": "config delivery.route"}]


def test_decisions_are_cached_by_matched_rules(tmp_path: Path) -> None:
    ps = load(tmp_path, {"p.yaml": "- name: x\n  match: {sender: [a@*]}\n  set: {store: false}\n"})
    assert ps.decide("a@example.test", "b@x.org") is ps.decide("A@example.test", "c@y.org")
    assert ps.decide("a@example.test", "b@x.org") is not ps.decide("z@example.test", "b@x.org")


def test_missing_directory(tmp_path: Path) -> None:
    # left at the default: no rules
    cfg = setup(tmp_path, {}, explicit_dir=False)
    (tmp_path / "policies").rmdir()
    ps = policies_for(load_config(cfg))
    assert len(ps) == 0 and ps.directory is None
    # set explicitly: an error at the key
    cfg.write_text(CONFIG + "policies_dir: ./nowhere\n")
    with pytest.raises(ConfigError) as ei:
        policies_for(load_config(cfg))
    (p,) = ei.value.problems
    assert str(p).startswith(f"{cfg}:15: policies_dir: {tmp_path}/nowhere does not exist")


def test_empty_files_hold_no_rules(tmp_path: Path) -> None:
    ps = load(tmp_path, {"a.yaml": "", "b.yml": "# only comments\n", "c.yaml": "[]\n"})
    assert len(ps) == 0 and len(ps.files) == 3


# ----------------------------------------------------------------------------------
# templates


def test_templates_variants_and_rendering(tmp_path: Path) -> None:
    t = tmp_path / "policies" / "templates"
    t.mkdir(parents=True)
    (t / "sig.html").write_text("<p style=\"p {margin:0}\"><b>{user.name}</b>, {user.title}"
                                "<br>{ company.name }</p>\n")
    (t / "sig.txt").write_text("-- \n{user.name} | {user.phone} | {user.email}\n")
    (t / "legal.txt").write_text("Sent by {company.name}.\nConfidential.\n")
    (t / "only.html").write_text("<p>Hi &amp; bye<br>{user.name}</p>")
    ps = load(tmp_path, {"p.yaml": """
- name: t
  set: {signature: templates/sig.html, disclaimer: templates/legal.txt}
- name: u
  match: {recipient: [x@y.test]}
  set: {signature: templates/only}
"""})
    cfg = ps.cfg
    user = cfg.user("rep@sales.example.test")
    s = ps.decide("rep@sales.example.test", "b@example.org").settings
    assert s.signature is not None and s.disclaimer is not None
    assert s.signature.name == "templates/sig.html"
    assert s.signature.describe() == "templates/sig.html (+ .txt)"
    assert s.signature.render_html(user, cfg.company) == (
        '<p style="p {margin:0}"><b>Rep &lt;One&gt;</b>, AE<br>Example &amp; Co</p>')
    assert s.signature.render_text(user, cfg.company) == (
        "-- \nRep <One> | +1 555 | rep@sales.example.test")
    # text-only: the HTML is derived (escaped, <br> per line break)
    assert s.disclaimer.render_html(user, cfg.company) == (
        "Sent by Example &amp; Co.<br>\nConfidential.")
    assert s.disclaimer.render_text(None, cfg.company) == "Sent by Example & Co.\nConfidential."
    # html-only (a name without suffix): the text is derived
    only = ps.decide("a@example.test", "x@y.test").settings.signature
    assert only is not None and only.text is None
    assert only.render_text(user, cfg.company) == "Hi & bye\nRep <One>"
    # no user (trusted network): empty user fields
    assert s.signature.render_text(None, Company(name="C")) == "-- \n |  | "
    assert set(ps.templates) == {"templates/sig.html", "templates/legal.txt", "templates/only"}


def test_render_template_function() -> None:
    u = User(login="a@x.test", password_hash=HASH, name="A & B", title="T", phone="1")
    c = Company(name="<C>")
    assert render_template("{user.name} {company.name} {other}", u, c) == "A & B <C> {other}"
    assert render_template("{user.name} {company.name}", u, c, html_escape=True) == \
        "A &amp; B &lt;C&gt;"
    assert render_template("{user.email}", None, c) == ""
    assert html_to_text("<style>p{x:1}</style><p>a</p><p>b &lt; c</p>") == "a\n\nb < c"


# ----------------------------------------------------------------------------------
# validation: every problem, each with file:line: key


def test_unknown_keys(tmp_path: Path) -> None:
    out = problems(tmp_path, {"p.yaml": """- name: a
  match: {sendr: ["*@x.test"]}
  set: {track_open: false}
  when: now
"""})
    f = tmp_path / "policies" / "p.yaml"
    assert out == [
        f"{f}:2: [0].match.sendr: unknown key 'sendr' (allowed here: sender, sender_domain, "
        "recipient, recipient_domain, user, account, header, not)",
        f"{f}:3: [0].set.track_open: unknown key 'track_open' (allowed here: track_opens, "
        "track_clicks, skip_links, signature, disclaimer, dkim, route, max_per_day, store, suppressed, "
        "skip_links_add)",
        f"{f}:4: [0].when: unknown key 'when' (allowed here: name, match, set)",
    ]


def test_wrong_types_and_values(tmp_path: Path) -> None:
    out = problems(tmp_path, {"p.yaml": """- name: a
  match:
    recipient_domain: [bob@example.org]
    header: {name: "X Bad", value: x}
    sender: []
  set:
    track_opens: perhaps
    route: carrier-pigeon
    max_per_day: 0
- name: b
  set: {max_per_day: "10", skip_links: [1]}
- name: c
  set: {}
- name: d
- set: {store: false}
- just text
- name: on
  set: {store: false}
"""})
    f = tmp_path / "policies" / "p.yaml"
    expected_prefixes = [
        f"{f}:3: [0].match.recipient_domain[0]: 'bob@example.org' is an address",
        f"{f}:4: [0].match.header.name: 'X Bad' is not a header field name",
        f"{f}:5: [0].match.sender: an empty list matches nothing",
        f"{f}:7: [0].set.track_opens: Input should be a valid boolean",
        f"{f}:8: [0].set.route: Input should be 'account', 'smarthost' or 'mx'",
        f"{f}:9: [0].set.max_per_day: Input should be greater than or equal to 1",
        f"{f}:11: [1].set.max_per_day: Input should be a valid integer",
        f"{f}:11: [1].set.skip_links[0]: Input should be a valid string",
        f"{f}:13: [2].set: needs at least one key",
        f"{f}:14: [3]: every rule needs a set:",
        f"{f}:15: [4]: every rule needs a name:",
        f"{f}:16: [5]: a rule is a mapping with name, match and set",
        f"{f}:17: [6].name: YAML reads this name as True; quote it",
    ]
    assert len(out) == len(expected_prefixes), out
    for line, prefix in zip(out, expected_prefixes, strict=True):
        assert line.startswith(prefix), (line, prefix)


def test_semantic_errors(tmp_path: Path) -> None:
    config = CONFIG.replace("dkim:\n  example.test: {selector: s1, key_file: dkim.pem}\n", "")
    config = config.replace("route: smarthost\n  smarthost: {host: 127.0.0.1, port: 2500, "
                            "tls: none}", "route: mx")
    config = config.replace("provider: gmail", "provider: imap, imap: {host: h, port: 993}")
    out = problems(tmp_path, {"p.yaml": """- name: a
  match: {user: [nobody@example.test, "*@sales.example.test"], account: [ghost]}
  set: {route: smarthost, dkim: true}
- name: b
  match: {header: {name: X-Tier, value: gold}}
  set: {max_per_day: 5, route: account}
"""}, config=config)
    f = tmp_path / "policies" / "p.yaml"
    assert out == [
        f"{f}:2: [0].match.user[0]: no user with login 'nobody@example.test' in the config's users:",
        f"{f}:2: [0].match.account[0]: no account with id 'ghost' in the config's accounts:",
        f"{f}:3: [0].set.route: route: smarthost but the config has no delivery.smarthost",
        f"{f}:3: [0].set.dkim: dkim: true but the config has no dkim: keys",
        f"{f}:6: [1].set.route: route: account but no account in the config has an SMTP upstream",
        f"{f}:6: [1].set.max_per_day: max_per_day cannot depend on a header match: the cap is "
        "checked at RCPT, before the headers are known",
    ]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    out = problems(tmp_path, {
        "a.yaml": "- name: cap\n  set: {max_per_day: 5}\n",
        "b.yaml": "# second file\n- name: other\n  set: {store: true}\n"
                  "- name: cap\n  set: {max_per_day: 9}\n",
    })
    a, b = tmp_path / "policies" / "a.yaml", tmp_path / "policies" / "b.yaml"
    assert out == [f"{b}:4: [1].name: duplicate rule name 'cap' (first at {a}:1)"]


def test_yaml_syntax_error_and_not_a_list(tmp_path: Path) -> None:
    out = problems(tmp_path, {"a.yaml": "- name: x\n  set: {store: [\n",
                              "b.yaml": "name: x\nset: {store: false}\n",
                              "c.yaml": "- name: fine\n  set: {store: false}\n"})
    pol = tmp_path / "policies"
    assert len(out) == 2
    assert out[0].startswith(f"{pol}/a.yaml:3: YAML syntax error: ")
    assert out[1] == (f"{pol}/b.yaml:1: a policy file is a list of rules "
                      "(- name: ..., match: ..., set: ...)")


def test_template_errors(tmp_path: Path) -> None:
    t = tmp_path / "policies" / "t"
    t.mkdir(parents=True)
    (t / "bad.html").write_text("<p>{user.name}</p>\n<p>{user.nmae}</p>\n<style>a {x: y}</style>"
                                "{company}\n")
    (t / "sig.pdf").write_text("x")
    (t / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    out = problems(tmp_path, {"p.yaml": """- name: a
  set:
    signature: t/missing.html
    disclaimer: t/bad.html
- name: b
  set: {signature: t/sig.pdf, disclaimer: t/nothing}
- name: c
  set: {signature: t/bad.html, disclaimer: t/latin1.txt}
"""})
    f = tmp_path / "policies" / "p.yaml"
    assert out == [
        f"{f}:3: [0].set.signature: template t/missing.html not found ({t}/missing.html)",
        f"{f}:6: [1].set.signature: t/sig.pdf: a template is a .html or .txt file, or a name "
        "without suffix for name.html and name.txt",
        f"{f}:6: [1].set.disclaimer: template t/nothing not found (neither {t}/nothing.html "
        f"nor {t}/nothing.txt)",
        f"{t}/bad.html:2: {{user.nmae}}: unknown placeholder; templates may use {{user.name}}, "
        "{user.title}, {user.phone}, {user.email}, {company.name}",
        f"{t}/bad.html:3: {{company}}: unknown placeholder; templates may use {{user.name}}, "
        "{user.title}, {user.phone}, {user.email}, {company.name}",
        f"{t}/latin1.txt: template is not UTF-8: invalid continuation byte",
    ]


def test_policies_dir_not_a_directory(tmp_path: Path) -> None:
    cfg = setup(tmp_path, {})
    (tmp_path / "policies").rmdir()
    (tmp_path / "policies").write_text("oops")
    with pytest.raises(ConfigError) as ei:
        policies_for(load_config(cfg))
    assert "policies_dir:" in str(ei.value) and "is not a directory" in str(ei.value)
    with pytest.raises(ConfigError):
        load_policies(tmp_path / "policies", load_config(cfg))


# ----------------------------------------------------------------------------------
# the shipped examples


def test_shipped_examples_load_and_behave() -> None:
    cfg = load_config(ROOT / "gateway.example.yaml")
    ps = policies_for(cfg)
    assert [f.name for f in ps.files] == ["10-internal.yaml", "20-signature.yaml",
                                          "30-limits.yaml", "40-no-tracking-for-sensitive.yaml"]
    assert cfg.company.name == "Example Corp"
    # the example user's mail to a customer keeps the config's tracking and gets no signature
    out = ps.decide("alice@example.test", "buyer@customer.example.org", "alice@example.test")
    s = out.settings
    assert (s.track_opens, s.track_clicks, s.signature, s.disclaimer, s.store) == \
        (True, True, None, None, True)
    assert s.max_per_day == 2000
    # internal mail is not tracked
    assert not ps.decide("alice@example.test", "bob@example.test").settings.track_opens
    # sales gets the signature and disclaimer; counsel gets the disclaimer only
    sales = ps.decide("rep@sales.example.test", "buyer@customer.example.org").settings
    assert sales.signature is not None and sales.signature.html is not None
    assert sales.signature.text is not None and sales.disclaimer is not None
    counsel = ps.decide("rep@sales.example.test", "x@counsel.example.test")
    assert counsel.settings.signature is None and counsel.settings.disclaimer is not None
    assert not counsel.settings.store
    # the opt-out header
    hdr = ps.decide("alice@example.test", "buyer@customer.example.org", "alice@example.test",
                    headers=[("X-Mailgw-No-Track", "yes")])
    assert hdr.source("track_opens").rule == "no tracking on request"
    # interns: a smaller cap
    assert ps.decide("intern-7@example.test", "a@b.example.org").settings.max_per_day == 100
    user = cfg.user("alice@example.test")
    assert "Alice Smith" in sales.signature.render_html(user, cfg.company)
    assert "Example Corp" in sales.disclaimer.render_text(user, cfg.company)


def test_company_config_key(tmp_path: Path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("hostname: gw.example.test\ncompany:\n  name: Acme\n  nmae: typo\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert [str(x) for x in ei.value.problems] == [
        f"{p}:4: company.nmae: unknown key (check the spelling; see gateway.example.yaml)"]
    p.write_text("hostname: gw.example.test\n")
    assert load_config(p).company.name == ""
