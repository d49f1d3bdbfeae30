"""Open an authenticated IMAPClient for one configured account (password, delegate or OAuth2).

    imap = await open_account(account, config.base_dir, tokens=token_manager)

Password accounts use AUTHENTICATE PLAIN (or LOGIN); `delegate` accounts log in as the
service account with the mailbox owner as SASL PLAIN authorization identity; `oauth2`
accounts get an access token from the TokenManager and, if the server refuses it,
refresh once (`rejected=`) and try again on a new connection before giving up with
`AccountAuthError`. Whatever fails, the connection is closed before the error goes up.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import Account, read_secret
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.imap.client import IMAPClient
from gateway.imap.oauth import TokenManager, credentials_from_config

__all__ = ["open_account"]


async def open_account(account: Account, base_dir: Path, *, tokens: TokenManager | None = None,
                       timeout: float = 60.0, connect_timeout: float = 30.0,
                       idle_interval: float = 25 * 60.0) -> IMAPClient:
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
    if auth.method == "oauth2":
        if tokens is None:
            raise ValueError("an oauth2 account needs a TokenManager")
        creds = credentials_from_config(account, base_dir)
        token = await tokens.access_token(account.id, creds)
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
                token = await tokens.access_token(account.id, creds, rejected=token)
            except BaseException:
                imap.close()
                raise
        raise AssertionError("unreachable")
    if not auth.password_file:
        raise AccountAuthError(f"account {account.id} has no auth.password_file")
    password = read_secret(auth.password_file, base_dir)
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
