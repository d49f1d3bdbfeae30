"""OAuth2 tokens: encryption at rest, key files, account config for oauth2 and delegate."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.accounts.grants import GrantClient
from gateway.accounts.providers import Providers
from gateway.config import Account, load_config
from gateway.errors import ConfigError
from gateway.keys.tokens import AccessToken, TokenCipher


def test_tokens_are_encrypted_and_bound_to_their_account() -> None:
    cipher = TokenCipher(TokenCipher.generate_key())
    token = AccessToken("at-secret-value", 1234.5, "rt-rotated")
    blob = cipher.encrypt("alice", token, "origin")
    assert b"at-secret-value" not in blob and b"rt-rotated" not in blob
    assert cipher.decrypt("alice", blob) == (token, "origin")
    assert cipher.decrypt("bob", blob) is None                       # associated data
    assert TokenCipher(TokenCipher.generate_key()).decrypt("alice", blob) is None  # other key
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert cipher.decrypt("alice", tampered) is None
    assert "secret" not in repr(token)


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    first = TokenCipher.from_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = first.encrypt("a", AccessToken("t", 1.0), "o")
    assert TokenCipher.from_key_file(path).decrypt("a", blob) is not None
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        TokenCipher.from_key_file(path)
    path.chmod(0o600)
    path.write_text("not base64 of 32 bytes\n")
    with pytest.raises(ConfigError, match="32 random bytes"):
        TokenCipher.from_key_file(path)


def write(tmp_path: Path, accounts: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text("accounts:\n" + accounts)
    return p


async def test_oauth2_account_from_config(tmp_path: Path) -> None:
    (tmp_path / "rt").write_text("rt-123\n")
    (tmp_path / "cs").write_text("client-secret\n")
    cfg = load_config(write(tmp_path, """\
  - id: bob
    email: bob@example.com
    provider: gmail
    auth: {method: oauth2, client_id: cid, client_secret_file: cs, refresh_token_file: rt}
  - id: carol
    email: carol@example.com
    provider: imap
    imap: {host: imap.example.com, port: 993}
    auth: {method: oauth2, token_endpoint: "https://idp.example.com/token", client_id: cid,
           refresh_token_file: rt, scope: mail, mechanism: oauthbearer}
"""))
    bob, carol = cfg.accounts
    grants = GrantClient()
    providers = Providers(lambda: cfg, grants)
    try:
        provider, client, scope = await providers.for_account(bob)
        assert provider.token_endpoint == "https://oauth2.googleapis.com/token"
        assert scope == "https://mail.google.com/ openid email"
        assert (client.client_id, client.client_secret) == ("cid", "client-secret")
        assert "client-secret" not in repr(client)
        endpoint = bob.imap_endpoint()
        assert endpoint is not None and endpoint.host == "imap.gmail.com"
        provider, client, scope = await providers.for_account(carol)
        assert (provider.token_endpoint, scope, client.client_secret) == (
            "https://idp.example.com/token", "mail", None)
        assert carol.auth.mechanism == "oauthbearer"
    finally:
        await grants.close()


@pytest.mark.parametrize(("auth", "message"), [
    ("{method: oauth2, refresh_token_file: rt, token_endpoint: 'https://x.test/t'}", "needs client_id"),
    ("{method: oauth2, client_id: c, refresh_token_file: rt}", "needs a token endpoint"),
    ("{method: oauth2, client_id: c, oauth_provider: corp}", "no OAuth provider 'corp'"),
    ("{method: service}", "needs service_account"),
    ("{method: service, service_account: nope}", "no service account 'nope'"),
    ("{method: oauth2, client_id: c, refresh_token_file: rt, token_endpoint: 'ftp://x'}", "not an http"),
    ("{method: password, password_file: pw, client_id: c}", "only apply to method: oauth2"),
    ("{method: delegate, password_file: pw}", "needs username"),
    ("{method: delegate, username: svc}", "needs password_file"),
    ("{method: password, password_file: pw, delegate_user: x}", "only applies to method: delegate"),
    ("{method: password}", "password_file is needed"),
])
def test_bad_auth_sections_name_file_line_and_key(tmp_path: Path, auth: str, message: str) -> None:
    (tmp_path / "pw").write_text("x")
    (tmp_path / "rt").write_text("x")
    p = write(tmp_path, f"""\
  - id: a
    email: a@example.com
    imap: {{host: imap.example.com, port: 993}}
    auth: {auth}
""")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    text = str(err.value)
    assert message in text, text
    assert f"{p}:" in text and "accounts[0]" in text


def test_unreadable_secret_files_and_never_synced_folders(tmp_path: Path) -> None:
    p = write(tmp_path, """\
  - id: a
    email: a@example.com
    imap: {host: imap.example.com, port: 993}
    auth: {method: oauth2, client_id: c, token_endpoint: "https://idp.example.com/t",
           refresh_token_file: missing-rt}
    sync: {folders: [INBOX, Junk, "[Gmail]/All Mail"]}
""")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    text = str(err.value)
    assert "accounts[0].sync.folders" in text and "never synced" in text
    p = write(tmp_path, """\
  - id: a
    email: a@example.com
    imap: {host: imap.example.com, port: 993}
    auth: {method: oauth2, client_id: c, token_endpoint: "https://idp.example.com/t",
           refresh_token_file: missing-rt}
""")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "accounts[0].auth.refresh_token_file: cannot read missing-rt" in str(err.value)


def test_delegate_account_defaults_to_the_accounts_own_mailbox() -> None:
    a = Account.model_validate({"id": "d", "email": "owner@example.com",
                                "imap": {"host": "h", "port": 143, "tls": "none"},
                                "auth": {"method": "delegate", "username": "svc",
                                         "password_file": "x"}})
    assert a.auth.delegate_user is None and a.email == "owner@example.com"


def test_check_refuses_combinations_that_cannot_work(tmp_path: Path) -> None:
    from gateway.errors import Problem

    (tmp_path / "pw").write_text("x")
    (tmp_path / "sa.json").write_text("{}")
    p = tmp_path / "gateway.yaml"
    p.write_text("""\
delivery: {route: account}
users:
  - {login: a@example.com, password_hash: "$argon2id$x", account: nosmtpcreds}
service_accounts:
  - {id: m365, kind: microsoft, tenant: t, client_id: c, client_secret_file: pw}
accounts:
  - id: nosmtpcreds
    email: a@example.com
    imap: {host: imap.example.com, port: 993}
    smtp: {host: smtp.example.com, port: 587}
    sync: {enabled: false}
  - {id: wrongkind, email: b@example.com, provider: gmail,
     auth: {method: service, service_account: m365}}
  - {id: gdelegate, email: c@example.com, provider: gmail,
     auth: {method: delegate, username: master, password_file: pw}}
  - {id: unconnected, email: d@example.com, provider: gmail, auth: {method: oauth2}}
  - {id: sendas, email: e@example.com, provider: gmail, send_as: [ghost@example.com],
     sync: {enabled: false}}
""")
    warnings: list[Problem] = []
    with pytest.raises(ConfigError) as err:
        load_config(p, warnings=warnings)
    text = str(err.value)
    assert "users[0].account" in text and "no SMTP credentials" in text and "530" in text
    assert "accounts[1].auth.service_account" in text and "a microsoft service account" in text
    assert "accounts[2].auth.method" in text and "delegate" in text
    assert "accounts[3].auth.client_id" in text              # no client id anywhere
    assert "accounts[4].send_as[0]" in text or "accounts[4].send_as.0" in text, text
    assert any("needs connecting" in str(w) for w in warnings)
