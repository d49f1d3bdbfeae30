"""`mailgw policy explain` and `mailgw check` (policies, TLS files), through `gateway.cli.main`
in this process (tests/support/cli.py), and each through `python -m gateway` too (the text
explanation, the example config's check, a daemon refusing bad policies)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.support.cli import mailgw_in_process, mailgw_process
from tests.support.tlscert import make_cert
from tests.unit.test_policy_engine import setup

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "gateway.example.yaml"


def mailgw(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`mailgw ARGS` run in this process from `cwd`."""
    return mailgw_in_process(args, cwd=cwd)


def mailgw_subprocess(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` of this tree, run from `cwd`."""
    return mailgw_process(args, cwd=cwd, env={"PYTHONPATH": str(ROOT)})


def test_explain_text() -> None:
    out = mailgw_subprocess("policy", "explain", "-c", str(EXAMPLE), "--from", "rep@sales.example.test",
                 "--to", "lawyer@counsel.example.test", "--subject", "Contract")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "header:   Subject: Contract" in text
    assert "policies: policies (4 files, 8 rules)" in text
    # matched rules in order with file:line
    matched = re.findall(r"^\s+\d+\. (.+?)\s+(policies/\S+:\d+)$", text, re.M)
    assert [m[0] for m in matched] == [
        "no tracking for internal mail", "sales signature", "no signature to outside counsel",
        "daily cap for our domain", "no tracking for legal and finance",
        "never rewrite signed or unsubscribe links"]
    assert matched[1][1] == "policies/20-signature.yaml:16"
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^  (\w+)\s+(.*?)\s*$", text.split("settings:\n", 1)[1], re.M)}
    assert rows["signature"].startswith("-") and \
        "rule 'no signature to outside counsel' (policies/20-signature.yaml:25)" in rows["signature"]
    assert rows["disclaimer"].startswith("templates/disclaimer.txt")
    assert "rule 'sales signature' (policies/20-signature.yaml:16)" in rows["disclaimer"]
    assert rows["store"].startswith("false") and "no tracking for legal and finance" in rows["store"]
    assert rows["route"].startswith("smarthost") and "default (config delivery.route)" in rows["route"]
    assert "default (config dkim: no key for the sender's domain)" in rows["dkim"]
    assert rows["max_per_day"].startswith("2000")


def test_explain_json_and_user_resolution() -> None:
    base = ["policy", "explain", "-c", str(EXAMPLE), "--json"]
    out = mailgw(*base, "--from", "alice@example.test", "--to", "buyer@customer.example.org",
                 "--header", "X-Mailgw-No-Track: yes")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)      # JSON only on stdout
    assert doc["user"] == "alice@example.test"   # --user defaults to the sender's login
    assert doc["headers"] == [["X-Mailgw-No-Track", "yes"]]
    assert doc["settings"]["track_opens"] is False
    assert doc["sources"]["track_opens"][0]["rule"] == "no tracking on request"
    assert doc["sources"]["track_opens"][0]["file"].endswith("40-no-tracking-for-sensitive.yaml")
    assert doc["sources"]["store"] == [{"default": "on"}]
    assert [m["rule"] for m in doc["matched"]] == [
        "daily cap for our domain", "no tracking on request",
        "never rewrite signed or unsubscribe links"]
    none = json.loads(mailgw(*base, "--from", "alice@example.test", "--to", "b@example.org",
                             "--no-user").stdout)
    assert none["user"] is None
    assert "header" in " ".join(none["notes"])      # no headers given: noted


def test_explain_usage_errors() -> None:
    base = ["policy", "explain", "-c", str(EXAMPLE), "--from", "a@example.test", "--to",
            "b@example.org"]
    out = mailgw(*base, "--user", "ghost@example.test")
    assert out.returncode == 2 and "no such user" in out.stderr
    out = mailgw(*base, "--header", "no colon here")
    assert out.returncode == 2 and "expected 'Name: value'" in out.stderr
    out = mailgw("policy", "explain", "-c", str(EXAMPLE), "--to", "b@example.org")
    assert out.returncode == 2 and "--from" in out.stderr


def test_check_and_explain_report_bad_policies(tmp_path: Path) -> None:
    cfg = setup(tmp_path, {"10-ok.yaml": "- name: ok\n  set: {store: false}\n",
                           "20-bad.yaml": "- name: bad\n  match: {sender: x@y}\n"
                                          "  set: {track_opens: 3}\n"})
    out = mailgw("check", "-c", str(cfg))
    assert out.returncode == 2
    bad = tmp_path / "policies" / "20-bad.yaml"
    assert f"{bad}:3: [0].set.track_opens: Input should be a valid boolean" in out.stderr
    out = mailgw("policy", "explain", "-c", str(cfg), "--from", "a@b.test", "--to", "c@d.test")
    assert out.returncode == 2 and f"{bad}:3:" in out.stderr
    out = mailgw_subprocess("run", "-c", str(cfg))   # the daemon refuses to start: exit 2
    assert out.returncode == 2 and f"{bad}:3:" in out.stderr
    bad.write_text("- name: fixed\n  set: {track_opens: false}\n")
    out = mailgw("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "2 policy rules in 2 files" in out.stdout


def test_check_example_config() -> None:
    out = mailgw_subprocess("check", "-c", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "8 policy rules in 4 files, 2 templates" in out.stdout


def test_explain_dkim_note_knows_parent_domain_keys(tmp_path: Path) -> None:
    cfg = setup(tmp_path, {"p.yaml": "- name: sign\n  set: {dkim: true}\n"})
    base = ["policy", "explain", "-c", str(cfg), "--json", "--no-user", "--to", "b@x.example.org"]
    sub = json.loads(mailgw(*base, "--from", "rep@sales.example.test").stdout)
    assert sub["settings"]["dkim"] is True and sub["notes"] == []   # example.test's key signs it
    other = json.loads(mailgw(*base, "--from", "x@other.example.org").stdout)
    assert other["notes"] == ["dkim is on but the config has no dkim: key for other.example.org: "
                              "nothing is signed"]


def test_check_loads_the_tls_certificate_of_every_smtp_listener(tmp_path: Path) -> None:
    a, b = make_cert(tmp_path, stem="a"), make_cert(tmp_path, stem="b")
    for listener in ("submission", "ingest"):
        cfg = tmp_path / f"{listener}.yaml"
        cfg.write_text(f"listeners:\n  {listener}:\n    tls: starttls\n"
                       f"    cert_file: {a.cert_file}\n    key_file: {b.key_file}\n"
                       "delivery: {route: mx}\n")
        out = mailgw("check", "-c", str(cfg), cwd=tmp_path)
        assert out.returncode == 2, out.stdout
        assert f"listeners.{listener}.cert_file: certificate and key do not load together" \
            in out.stderr
