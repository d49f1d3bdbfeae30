"""Open an authenticated IMAPClient for one configured account (password, delegate or OAuth2).

    imap = await open_account(account, config.base_dir, tokens=token_source, secrets=registry)

Password accounts use AUTHENTICATE PLAIN (or LOGIN), with `auth.password_file` or, for an
account created at run time, the password the store keeps (`secrets`); `delegate`
accounts log in as the service account with the mailbox owner as SASL PLAIN
authorization identity; `oauth2` and `service` accounts get an access token from the
TokenSource (`gateway.directory`) and, if the server refuses it,
refresh once (`rejected=`) and try again on a new connection before giving up with
`AccountAuthError`. Whatever fails, the connection is closed before the error goes up.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import Account, read_secret
from gateway.directory import SecretSource, TokenSource
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.imap.client import IMAPClient

__all__ = ["open_account"]


async def open_account(account: Account, base_dir: Path, *, tokens: TokenSource | None = None,
                       secrets: SecretSource | None = None, timeout: float = 60.0,
                       connect_timeout: float = 30.0, idle_interval: float = 25 * 60.0) -> IMAPClient:
    """Connect and authenticate; raises AccountAuthError or AccountUnavailable (typed)."""
    endpoint = account.imap_endpoint()
    if endpoint is None:
        raise AccountUnavailable(f"account {account.id} has no IMAP server (imap: or a provider)")
    ca = _relative(endpoint.ca_file, base_dir) if endpoint.ca_file else None

    def client() -> IMAPClient:
        return IMAPClient(endpoint.host, endpoint.port, tls=endpoint.tls, ca_file=ca,
                          timeout=timeout, connect_timeout=connect_timeout,
                          idle_interval=idle_interval)

    auth = account.auth
    username = auth.username or account.email
    if auth.uses_tokens:
        if tokens is None:
            raise ValueError(f"an {auth.method} account needs a TokenSource")
        token = await tokens.access_token(account.id)
        for attempt in (1, 2):
            imap = client()
            try:
                await imap.connect()
                if auth.mechanism == "oauthbearer":
                    await imap.authenticate_oauthbearer(username, token)
                else:
                    await imap.authenticate_xoauth2(username, token)
                return imap
            except AccountAuthError:
                imap.close()
                if attempt == 2:
                    raise
                token = await tokens.access_token(account.id, rejected=token)
            except BaseException:
                imap.close()
                raise
        raise AssertionError("unreachable")
    if auth.password_file:
        password = read_secret(auth.password_file, base_dir)
    elif secrets is not None and account.origin == "runtime":
        password = await secrets.password(account.id)
    else:
        raise AccountAuthError(f"account {account.id} has no auth.password_file")
    imap = client()
    try:
        await imap.connect()
        if auth.method == "delegate":
            await imap.authenticate_plain(username, password,
                                          authzid=auth.delegate_user or account.email)
        else:
            await imap.authenticate_password(username, password)
    except BaseException:
        imap.close()
        raise
    return imap


def _relative(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p
