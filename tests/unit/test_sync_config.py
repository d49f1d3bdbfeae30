"""The `sync:` section and the per-account sync keys: defaults, bounds, errors with file/line/key;
who saves sent mail by itself; who gets a Sent copy; which addresses count as the account's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Account, Config, load_config
from gateway.errors import ConfigError
from gateway.imap.sent import SentCopies
from gateway.mail.own import OwnAddresses

HASH = "$argon2id$v=19$m=65536,t=3,p=4$kumKlkCTqYtNQ2fFQqJ3oA$T7n9YXOz6qMoKUjDgNgw15ZhvCBQzCxNsuxICupOA44"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "pw").write_text("secret\n")
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return p


def test_sync_defaults_and_durations(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "sync:\n  poll_interval: 5m\n  lease_ttl: 90s\n"))
    s = cfg.sync
    assert (s.poll_interval, s.lease_ttl) == (300.0, 90.0)
    assert s.max_connections == 20 and s.idle_interval == 25 * 60 and s.check_interval == 2.0
    assert Config().sync.backoff_max == 300.0


@pytest.mark.parametrize(("text", "key", "words"), [
    ("sync:\n  idle_interval: 31m\n", "sync.idle_interval", "less than or equal to 1740"),
    ("sync:\n  max_connections: 0\n", "sync.max_connections", "greater than or equal to 1"),
    ("sync:\n  backoff_min: 10s\n  backoff_max: 1s\n", "sync", "backoff_max must not be below"),
    ("sync:\n  polling: 1s\n", "sync.polling", "unknown key"),
    ("accounts:\n  - id: a\n    email: a@example.com\n    provider: gmail\n"
     "    auth: {password_file: pw}\n    sync: {folders: [INBOX, Junk]}\n",
     "accounts[0].sync.folders", "never synced"),
    ("accounts:\n  - id: a\n    email: a@example.com\n    provider: gmail\n"
     "    auth: {password_file: pw}\n    sync: {direction: both}\n",
     "accounts[0].sync.direction", "two-way"),
])
def test_sync_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    [problem] = err.value.problems
    assert problem.key == key and words in problem.message, problem
    assert problem.line is not None


def account(provider: str, **extra: object) -> Account:
    d: dict[str, object] = {"id": "a", "email": "a@example.com", "provider": provider,
                            "auth": {"password_file": "pw"}}
    if provider == "imap":
        d["imap"] = {"host": "imap.example.com", "port": 993}
    d.update(extra)
    return Account.model_validate(d)


@pytest.mark.parametrize(("provider", "saves"), [
    ("gmail", True), ("microsoft365", True), ("outlook", True), ("yahoo", True),
    ("icloud", False), ("zoho", False), ("imap", False)])
def test_who_saves_sent_mail_by_itself(provider: str, saves: bool) -> None:
    assert account(provider).saves_sent() is saves
    assert account(provider, smtp={"saves_sent": not saves}).saves_sent() is (not saves)


def test_who_gets_a_sent_copy() -> None:
    gmail, plain = account("gmail"), account("imap")
    # through the provider's own SMTP: only where the provider does not file it itself
    assert not SentCopies.wanted(gmail, via_account_smtp=True)
    assert SentCopies.wanted(plain, via_account_smtp=True)
    # through a smarthost or MX the provider never saw it: always a copy
    assert SentCopies.wanted(gmail, via_account_smtp=False)
    # one-way accounts too; accounts without sync (no IMAP credentials) never
    assert SentCopies.wanted(account("imap", sync={"direction": "one-way"}), via_account_smtp=False)
    off = Account.model_validate({"id": "b", "email": "b@example.com", "provider": "gmail",
                                  "sync": {"enabled": False}})
    assert not SentCopies.wanted(off, via_account_smtp=False)
    assert not off.tailed and not account("gmail", sync={"direction": "one-way"}).tailed


def test_own_addresses_cover_the_login_the_delegate_and_users() -> None:
    cfg = Config.model_validate({
        "users": [{"login": "Alice.Smith@Example.com", "password_hash": HASH, "account": "a"},
                  {"login": "bob@example.com", "password_hash": HASH}],
        "accounts": [{"id": "a", "email": "alice@example.com", "provider": "gmail",
                      "auth": {"username": "asmith@example.com", "password_file": "pw"}},
                     {"id": "d", "email": "carol@example.com", "provider": "microsoft365",
                      "auth": {"method": "delegate", "username": "svc@example.com",
                               "password_file": "pw", "delegate_user": "carol.x@example.com"}}]})
    own = OwnAddresses.of(cfg)
    assert own.account_addresses("a") == {"alice@example.com", "asmith@example.com",
                                          "alice.smith@example.com"}
    # the service account is not the rep: its address is not "sent by this account"
    assert own.account_addresses("d") == {"carol@example.com", "carol.x@example.com"}
