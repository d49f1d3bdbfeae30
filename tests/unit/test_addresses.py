"""The open-relay tricks are refused; ordinary addresses pass."""

import pytest

from gateway.mail.addresses import relay_trick


@pytest.mark.parametrize("addr", [
    "bob@example.com", "first.last+tag@sub.example.co.uk", "o'neil@example.org",
    "użytkownik@example.pl",
])
def test_plain_addresses_pass(addr: str) -> None:
    assert relay_trick(addr) is None


@pytest.mark.parametrize(("addr", "why"), [
    ("victim%evil.com@example.com", "percent"),
    ("evil.com!victim@example.com", "bang"),
    ("@relay.example.com:victim@evil.com", "source route"),
    ('"victim@evil.com"@example.com', "quoted"),
    ('"victim%evil.com"@example.com', "quoted"),
    ("victim@[192.0.2.1]", "IP-literal"),
    ("victim@[IPv6:2001:db8::1]", "source route"),
    ("victim", "exactly one @"),
    ("a@b@example.com", "exactly one @"),
    ("victim@localhost", "bad domain"),
    (".dot@example.com", "bad local part"),
    ("victim@evil..com", "bad domain"),
])
def test_relay_tricks_refused(addr: str, why: str) -> None:
    reason = relay_trick(addr)
    assert reason is not None and why in reason
