"""The outbound planner: per-recipient copies only where tracking applies, shared copies otherwise,
stages then DKIM last, the untouched message passed through as the same bytes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml

from gateway.config import load_config
from gateway.keys import dkim as dkimkeys
from gateway.pipeline.dkim import Signer
from gateway.pipeline.outbound import Outbound
from gateway.policy import policies_for
from gateway.tracking.tokens import TokenSigner

HTML = (b"From: Alice <alice@example.com>\r\nTo: a@acme.test, b@acme.test, c@example.com\r\n"
        b"Subject: Offer\r\nMessage-ID: <m1@example.com>\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><body><p>See <a href=\"https://acme.test/offer?a=1&amp;b=2\">the offer</a>."
        b"</p></body></html>\r\n")
TEXT = HTML.replace(b"text/html", b"text/plain").replace(b"<html>", b"").replace(b"</html>", b"")
TOKENS = TokenSigner([b"k" * 32])


def setup(tmp_path: Path, policies: dict[str, str], tracking: bool = True,
          dkim_key: dkimkeys.PrivateKey | None = None) -> Outbound:
    data: dict[str, object] = {"hostname": "gw.example.test", "delivery": {"route": "mx"},
                               "company": {"name": "Example Co"},
                               "users": [{"login": "alice@example.com", "name": "Alice A",
                                          "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$x$y"}]}
    if tracking:
        data["listeners"] = {"tracking": {"host": "127.0.0.1", "port": 8090,
                                          "base_url": "https://t.example.com"}}
    if dkim_key is not None:
        (tmp_path / "dkim.pem").write_bytes(dkimkeys.private_pem(dkim_key))
        data["dkim"] = {"example.com": {"selector": "s1", "key_file": "dkim.pem"}}
    (tmp_path / "policies").mkdir(exist_ok=True)
    for name, text in policies.items():
        (tmp_path / "policies" / name).write_text(text)
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "gateway.yaml")
    signer = Signer.from_config(cfg) if dkim_key is not None else None
    return Outbound(cfg, policies_for(cfg), signer, lambda: TOKENS)


NO_TRACK_INTERNAL = """- name: internal
  match: {recipient_domain: [example.com]}
  set: {track_opens: false, track_clicks: false}
"""


def test_untouched_message_is_one_copy_of_the_same_bytes(tmp_path: Path) -> None:
    out = setup(tmp_path, {"10.yaml": "- name: quiet\n  set: {track_opens: false, track_clicks: false}\n"})
    plans = out.plan(HTML, sender="alice@example.com", recipients=["a@acme.test", "b@acme.test"],
                     user="alice@example.com", account=None, first_id="01J0000000000000000000000A")
    assert len(plans) == 1
    assert plans[0].data is HTML and plans[0].recipients == ["a@acme.test", "b@acme.test"]
    assert plans[0].queue_id == "01J0000000000000000000000A" and not plans[0].tracked


def test_tracked_recipients_get_their_own_copies_and_others_share(tmp_path: Path) -> None:
    out = setup(tmp_path, {"10.yaml": NO_TRACK_INTERNAL})
    plans = out.plan(HTML, sender="alice@example.com",
                     recipients=["a@acme.test", "c@example.com", "b@acme.test", "d@example.com"],
                     user="alice@example.com", account=None)
    tracked = [p for p in plans if p.tracked]
    shared = [p for p in plans if not p.tracked]
    assert [p.recipients for p in tracked] == [["a@acme.test"], ["b@acme.test"]]
    assert shared[0].recipients == ["c@example.com", "d@example.com"] and shared[0].data is HTML
    for p in tracked:
        tokens = re.findall(rb"https://t\.example\.com/([oc])/([A-Za-z0-9_.-]+)", p.data)
        kinds = {k for k, _ in tokens}
        assert kinds == {b"o", b"c"}
        for _, tok in tokens:
            d = TOKENS.verify(tok.decode())
            assert d is not None and d.copy_id == p.queue_id
        assert p.links == 1
        clicks = [TOKENS.verify(t.decode()) for k, t in tokens if k == b"c"]
        assert "https://acme.test/offer?a=1&b=2" in {c.url for c in clicks if c}
    assert len({p.queue_id for p in plans}) == len(plans)


def test_plain_text_with_tracking_is_shared_untouched(tmp_path: Path) -> None:
    out = setup(tmp_path, {})
    plans = out.plan(TEXT, sender="alice@example.com", recipients=["a@acme.test", "b@acme.test"],
                     user="alice@example.com", account=None)
    assert len(plans) == 1 and plans[0].data is TEXT and not plans[0].tracked


def test_tracked_recipients_share_a_copy_that_got_no_tokens(tmp_path: Path) -> None:
    """Tracking on, but nothing to put a token in (plain text): the signature makes the copy
    differ from the submission, yet it is the same for everyone, so it is shared."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "sig.txt").write_text("{user.name}\n")
    out = setup(tmp_path, {"10.yaml": "- name: sig\n  set: {signature: sig.txt}\n"})
    plans = out.plan(TEXT, sender="alice@example.com", recipients=["a@acme.test", "b@acme.test"],
                     user="alice@example.com", account=None)
    assert [(p.recipients, p.tracked) for p in plans] == [(["a@acme.test", "b@acme.test"], False)]
    assert b"-- \r\nAlice A" in plans[0].data and not re.search(rb"://[^/\s\"]+/o/", plans[0].data)


def test_header_rules_see_the_message_headers(tmp_path: Path) -> None:
    out = setup(tmp_path, {"10.yaml": "- name: opt out\n  match: {header: {name: Subject, value: "
                                      "\"Off*\"}}\n  set: {track_opens: false, track_clicks: false}\n"})
    plans = out.plan(HTML, sender="alice@example.com", recipients=["a@acme.test"],
                     user="alice@example.com", account=None)
    assert len(plans) == 1 and plans[0].data is HTML and not plans[0].tracked
    other = HTML.replace(b"Subject: Offer", b"Subject: News")
    plans = out.plan(other, sender="alice@example.com", recipients=["a@acme.test"],
                     user="alice@example.com", account=None)
    assert len(plans) == 1 and plans[0].tracked


def test_no_tracking_listener_means_no_tracking(tmp_path: Path) -> None:
    out = setup(tmp_path, {}, tracking=False)
    plans = out.plan(HTML, sender="alice@example.com", recipients=["a@acme.test", "b@acme.test"],
                     user="alice@example.com", account=None)
    assert len(plans) == 1 and plans[0].data is HTML


def test_signature_shared_and_dkim_signed_last(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "sig.txt").write_text("{user.name}\n{company.name}\n")
    key = dkimkeys.generate("rsa-sha256", 1024)
    out = setup(tmp_path, {"10.yaml": "- name: sig\n  set: {signature: sig.txt, track_opens: false,"
                                      " track_clicks: false}\n"}, dkim_key=key)
    plans = out.plan(TEXT, sender="alice@example.com", recipients=["a@acme.test", "b@acme.test"],
                     user="alice@example.com", account=None)
    assert len(plans) == 1 and plans[0].signed
    data = plans[0].data
    assert data.startswith(b"DKIM-Signature:")
    assert b"Alice A" in data and b"Example Co" in data
    record = dkimkeys.dns_record(key).encode()
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record)


def test_subdomain_sender_is_signed_by_default_with_the_parent_key(tmp_path: Path) -> None:
    key = dkimkeys.generate("rsa-sha256", 1024)
    out = setup(tmp_path, {}, tracking=False, dkim_key=key)
    raw = TEXT.replace(b"alice@example.com", b"rep@sales.example.com")
    plans = out.plan(raw, sender="rep@sales.example.com", recipients=["a@acme.test"],
                     user=None, account=None)
    assert len(plans) == 1 and plans[0].dkim and plans[0].signed
    assert b"d=example.com" in plans[0].data.split(b"\r\n\r\n", 1)[0]
    record = dkimkeys.dns_record(key).encode()
    assert dkim.verify(plans[0].data, dnsfunc=lambda name, timeout=5: record)


def test_settings_resolved_once_per_message_and_per_distinct_decision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates are rendered once per message and decision, not per recipient copy; two
    decisions (a signature per recipient domain) still give each recipient its own."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "acme.txt").write_text("For Acme: {user.name}\n")
    (tmp_path / "policies" / "other.txt").write_text("For others: {user.name}\n")
    out = setup(tmp_path, {"10.yaml": "- name: all\n  set: {signature: other.txt}\n"
                                      "- name: acme\n  match: {recipient_domain: [acme.test]}\n"
                                      "  set: {signature: acme.txt}\n"})
    calls = []
    real = Outbound._stage_settings

    def counting(self: Outbound, *a: Any, **kw: Any) -> Any:
        calls.append(a)
        return real(self, *a, **kw)

    monkeypatch.setattr(Outbound, "_stage_settings", counting)
    rcpts = ["a@acme.test", "x@example.net", "b@acme.test", "y@example.net", "c@acme.test"]
    plans = out.plan(HTML, sender="alice@example.com", recipients=rcpts,
                     user="alice@example.com", account=None)
    assert len(calls) == 2
    by = {p.recipients[0]: p.data for p in plans}
    assert len(plans) == 5 and all(p.tracked for p in plans)
    for r in rcpts:
        want, other = (b"For Acme: Alice A", b"For others") if r.endswith("acme.test") \
            else (b"For others: Alice A", b"For Acme")
        assert want in by[r] and other not in by[r]
