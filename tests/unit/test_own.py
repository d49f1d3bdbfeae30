"""OwnAddresses: the one "which addresses are ours" that ingest, the tailer, linking and submission ask."""

from __future__ import annotations

from typing import Any

from gateway.config import Config
from gateway.crm.linking import LinkRules
from gateway.mail.own import OwnAddresses, Owner

HASH = "$argon2id$v=19$m=65536,t=3,p=4$kumKlkCTqYtNQ2fFQqJ3oA$T7n9YXOz6qMoKUjDgNgw15ZhvCBQzCxNsuxICupOA44"


def config(**over: Any) -> Config:
    data: dict[str, Any] = {
        "users": [{"login": "Alice@Example.com", "password_hash": HASH, "account": "a"},
                  {"login": "alice2@example.com", "password_hash": HASH, "account": "a"},
                  {"login": "bob@example.com", "password_hash": HASH}],
        "accounts": [{"id": "a", "email": "alice.smith@example.com", "provider": "gmail",
                      "auth": {"username": "asmith@example.com", "password_file": "pw"}},
                     {"id": "d", "email": "carol@corp.example", "provider": "microsoft365",
                      "auth": {"method": "delegate", "username": "svc@example.net",
                               "password_file": "pw", "delegate_user": "carol.x@corp.example"}}],
        "ingest": {"addresses": ["CRM@gw.example"]},
    }
    data.update(over)
    return Config.model_validate(data)


def test_user_addresses_are_logins_and_mailbox_addresses() -> None:
    own = OwnAddresses.of(config())
    assert own.user_addresses == {"alice@example.com", "alice2@example.com", "bob@example.com",
                                  "alice.smith@example.com", "asmith@example.com",
                                  "carol@corp.example", "carol.x@corp.example"}
    assert own.is_user_address(" Alice.Smith@EXAMPLE.com ")
    assert not own.is_user_address("svc@example.net")  # a delegate's service account is not ours
    assert not own.is_user_address("crm@gw.example")
    assert not own.is_user_address("someone@example.com")


def test_ingest_addresses_are_ours_but_no_user_address() -> None:
    own = OwnAddresses.of(config())
    assert own.is_ingest("crm@GW.example") and own.is_ingest(" CRM@gw.example")
    assert not own.is_ingest("alice@example.com")
    assert own.is_ours("crm@gw.example") and own.is_ours("carol.x@corp.example")
    assert own.ours == own.user_addresses | {"crm@gw.example"}


def test_own_domains_are_the_domains_of_our_addresses() -> None:
    own = OwnAddresses.of(config())
    assert own.domains == {"example.com", "corp.example", "gw.example"}
    assert own.is_own_domain("Corp.Example") and not own.is_own_domain("example.net")


def test_owner_login_before_mailbox_and_first_user_of_an_account() -> None:
    own = OwnAddresses.of(config())
    assert own.owner("ALICE@example.com") == Owner("Alice@Example.com", "a")
    assert own.owner("alice2@example.com") == Owner("alice2@example.com", "a")
    assert own.owner("asmith@example.com") == Owner("Alice@Example.com", "a")
    assert own.owner("bob@example.com") == Owner("bob@example.com", None)
    assert own.owner("carol.x@corp.example") == Owner(None, "d")
    assert own.owner("crm@gw.example") is None and own.owner("x@y.example") is None
    assert own.user_of_account("a") == "Alice@Example.com" and own.user_of_account("d") is None


def test_account_addresses_are_its_mailbox_and_its_users() -> None:
    own = OwnAddresses.of(config())
    assert own.account_addresses("a") == {"alice.smith@example.com", "asmith@example.com",
                                          "alice@example.com", "alice2@example.com"}
    assert own.account_addresses("d") == {"carol@corp.example", "carol.x@corp.example"}
    assert own.account_addresses("nope") == frozenset()


def test_sender_addresses_are_the_login_and_the_accounts_mailbox() -> None:
    own = OwnAddresses.of(config())
    assert own.sender_addresses("alice@EXAMPLE.com") == {"alice@example.com",
                                                         "alice.smith@example.com",
                                                         "asmith@example.com"}
    assert "alice2@example.com" not in own.sender_addresses("alice@example.com")
    assert own.sender_addresses("bob@example.com") == {"bob@example.com"}
    assert own.sender_addresses("mallory@example.com") == frozenset()


def test_built_once_per_config_and_again_for_a_reloaded_one() -> None:
    cfg = config()
    assert OwnAddresses.of(cfg) is OwnAddresses.of(cfg)
    reloaded = config(ingest={"addresses": ["log@gw.example"]})
    own = OwnAddresses.of(reloaded)
    assert own is not OwnAddresses.of(cfg)
    assert own.is_ingest("log@gw.example") and not own.is_ingest("crm@gw.example")
    assert OwnAddresses.of(cfg).is_ingest("crm@gw.example")


def test_linking_asks_the_same_answer() -> None:
    cfg = config()
    rules = LinkRules.from_config(cfg)
    own = OwnAddresses.of(cfg)
    assert rules.own_addresses == own.ours and rules.own_domains == own.domains
    assert not rules.linkable("ASmith@example.com")  # a mailbox login is never a contact
    assert rules.linkable("customer@client.example")
